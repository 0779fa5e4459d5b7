# bash completion for pbrpc(1): commands, options, --format values, files
# for --protoset, and the server's services and methods (asked with
# `pbrpc list`, from the ENDPOINT on the line or $PBRPC_ENDPOINT, or from the
# --protoset). Installed as share/bash-completion/completions/pbrpc; plain
# bash, bash-completion's helpers are not needed. zsh can use it through
# `autoload bashcompinit && bashcompinit && source pbrpc.bash`.

_pbrpc_words() {
	# The line up to the cursor, split on blanks only: ENDPOINTs contain ':',
	# which bash's COMP_WORDBREAKS would split them on.
	local line=${COMP_LINE:0:COMP_POINT}
	read -ra _pbrpc_w <<<"$line"
	if [[ $line == *[[:blank:]] ]]; then
		_pbrpc_w+=("")
	fi
}

# _pbrpc_reply WORD... : COMPREPLY from the words matching the current one,
# each trimmed up to its last ':' when the current word has one, as bash
# then completes only the part after it.
_pbrpc_reply() {
	local cur=$1 w
	shift
	COMPREPLY=()
	for w in "$@"; do
		[[ $w == "$cur"* ]] || continue
		if [[ $cur == *:* ]]; then
			w=${w#"${cur%:*}:"}
		fi
		COMPREPLY+=("$w")
	done
}

_pbrpc() {
	local -a _pbrpc_w
	_pbrpc_words
	local n=${#_pbrpc_w[@]} cur=${_pbrpc_w[-1]} prev=
	[ "$n" -ge 2 ] && prev=${_pbrpc_w[-2]}
	local commands="list describe call health stats help"
	local options="--timeout --metadata --protoset --format --emit-defaults --template --verbose --help --version"

	case $prev in
	--format)
		_pbrpc_reply "$cur" json compact text table prometheus
		return
		;;
	--protoset)
		COMPREPLY=($(compgen -f -- "$cur"))
		compopt -o filenames 2>/dev/null
		return
		;;
	-t | --timeout | -m | --metadata)
		COMPREPLY=()
		return
		;;
	esac
	if [[ $cur == -* ]]; then
		_pbrpc_reply "$cur" $options
		return
	fi

	# The command, the endpoint and the --protoset given so far.
	local i w cmd= endpoint= protoset= npos=0
	for ((i = 1; i < n - 1; i++)); do
		w=${_pbrpc_w[i]}
		case $w in
		--protoset | -t | --timeout | -m | --metadata | --format)
			[ "$w" = --protoset ] && protoset=${_pbrpc_w[i + 1]}
			((i++))
			;;
		--protoset=*) protoset=${w#--protoset=} ;;
		-*) ;;
		*)
			if [ -z "$cmd" ]; then
				cmd=$w
			elif [[ $w == *:* ]] && [ -z "$endpoint" ] && [ "$npos" = 0 ]; then
				endpoint=$w
			else
				npos=$((npos + 1))
			fi
			;;
		esac
	done
	if [ -z "$cmd" ]; then
		_pbrpc_reply "$cur" $commands
		return
	fi
	[ "$cmd" = help ] && { _pbrpc_reply "$cur" $commands; return; }
	if [[ $cur == unix:* ]]; then
		local f files=()
		while IFS= read -r f; do files+=("unix:$f"); done < <(compgen -f -- "${cur#unix:}")
		_pbrpc_reply "$cur" "${files[@]}"
		return
	fi
	[ "$npos" -gt 0 ] && { COMPREPLY=(); return; } # past METHOD, SYMBOL or SERVICE

	if [ "$cmd" = stats ]; then # only an ENDPOINT
		if [ -z "$endpoint" ]; then _pbrpc_reply "$cur" unix: tcp:; else COMPREPLY=(); fi
		return
	fi
	local -a args=(--timeout 2s)
	[ -n "$protoset" ] && args+=(--protoset "$protoset")
	[ -n "$endpoint" ] && args+=("$endpoint")
	local listing
	if [ -z "$endpoint" ] && [ -z "$protoset" ] && [ -z "${PBRPC_ENDPOINT:-}" ]; then
		_pbrpc_reply "$cur" unix: tcp:
		return
	fi
	listing=$("${_pbrpc_w[0]}" list "${args[@]}" 2>/dev/null) || { COMPREPLY=(); return; }
	local services=() methods=() line
	while IFS= read -r line; do
		if [[ $line == "  "* ]]; then
			line=${line#  }
			methods+=("${line%%(*}")
		else
			services+=("$line")
		fi
	done <<<"$listing"
	case $cmd in
	call) _pbrpc_reply "$cur" "${methods[@]}" ;;
	describe) _pbrpc_reply "$cur" "${services[@]}" "${methods[@]}" ;;
	health) _pbrpc_reply "$cur" "${services[@]}" ;;
	*) COMPREPLY=() ;;
	esac
}

complete -F _pbrpc pbrpc

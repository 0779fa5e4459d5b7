/* pbrpc.Health (being written). */
#include "server_internal.h"

/* pbrpc.Reflection (being written). */
#include "server_internal.h"

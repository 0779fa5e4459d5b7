/* pbrpc server (being written). */
#include "pbrpc/server.h"

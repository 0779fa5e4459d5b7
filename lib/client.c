/* pbrpc client (being written). */
#include "pbrpc/client.h"

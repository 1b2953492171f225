/* Our C glue around libvhost-user: adapts its callbacks to ours (see vhost/lvu.py). */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include "libvhost-user.h"

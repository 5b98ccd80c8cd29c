#include "clibtpms.h"

// Stand-in for the CUDA header: everything is in emu.h.
#pragma once
#include "../emu.h"

// Part of the emulator metal_stdlib (see metal_stdlib.h).
#pragma once
#include "metal_types.h"

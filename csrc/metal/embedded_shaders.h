// The shaders/*.metal sources, embedded at build time by setup.py with their
// #include "..." lines resolved (generated into build/generated/, never hand-edited).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace my_mps_ops {

// (file stem, source) for every shaders/*.metal file, e.g. ("rms_norm", "...").
const std::vector<std::pair<std::string, std::string>>& embedded_shaders();

// Source of one embedded shader library; throws if there is none of that name.
const std::string& embedded_shader(const std::string& library);

}  // namespace my_mps_ops

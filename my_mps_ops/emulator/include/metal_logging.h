// <metal_logging> (MSL 3.2): os_log. The emulator discards the messages: they are formatted on
// the GPU from arguments printf cannot take (half, vectors), and a log is no part of a result.
// Part of the emulator's metal_stdlib (see metal_stdlib.h).
#pragma once

namespace metal {
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... A> void log(const char*, A...) const {}
  template <class... A> void log_debug(const char*, A...) const {}
  template <class... A> void log_info(const char*, A...) const {}
  template <class... A> void log_error(const char*, A...) const {}
  template <class... A> void log_fault(const char*, A...) const {}
};
}  // namespace metal

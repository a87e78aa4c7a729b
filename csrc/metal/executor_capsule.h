// How an executor built in another extension module reaches executor_for():
// a PyCapsule named kExecutorCapsuleName holding a metal::Executor*, handed to
// _C._set_cpu_executor (the Metal emulator, my_mps_ops._emulator, does this on
// import). Both modules compile metal/launch.h with the same flags, and only
// virtual calls on the Executor cross between them: no typeinfo is shared.
#pragma once

namespace my_mps_ops::metal {

inline constexpr char kExecutorCapsuleName[] = "my_mps_ops.metal.Executor";

}  // namespace my_mps_ops::metal

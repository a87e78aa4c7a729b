// MetalPerformanceShaders (Apple), declaration subset for the Linux syntax
// check of csrc/metal/*.mm only: not the SDK, nothing here is ever linked.
// Only the class PyTorch's ATen/mps/MPSStream.h names, as declared in the
// macOS SDK's MPSCore/MPSCommandBuffer.h. See test/objc/objc_sdk/README.md.
#pragma once

#include <Metal/Metal.h>

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end

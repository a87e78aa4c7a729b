// Declaration subset of Apple's MetalPerformanceShaders: only the class
// PyTorch's ATen/mps/MPSStream.h names. For the Linux syntax check only.
#pragma once

#include <Metal/Metal.h>

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end

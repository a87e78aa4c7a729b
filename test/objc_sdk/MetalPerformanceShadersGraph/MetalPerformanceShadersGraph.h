// Declaration subset of Apple's MetalPerformanceShadersGraph: only the classes
// PyTorch's ATen/mps/MPSStream.h names. For the Linux syntax check only.
#pragma once

#include <MetalPerformanceShaders/MetalPerformanceShaders.h>

@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end

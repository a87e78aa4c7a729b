// MetalPerformanceShadersGraph (Apple), declaration subset for the Linux
// syntax check of csrc/metal/*.mm only: not the SDK, nothing here is ever
// linked. Only the classes PyTorch's ATen/mps/MPSStream.h names, with the
// superclasses of the macOS SDK's MPSGraphCore.h, MPSGraph.h and
// MPSGraphExecutable.h. See test/objc/objc_sdk/README.md.
#pragma once

#include <MetalPerformanceShaders/MetalPerformanceShaders.h>

@interface MPSGraphObject : NSObject
@end

@interface MPSGraph : MPSGraphObject
@end

@interface MPSGraphExecutionDescriptor : MPSGraphObject
@end

@interface MPSGraphCompilationDescriptor : MPSGraphObject <NSCopying>
@end

// Metal (Apple), declaration subset for the Linux syntax check of
// csrc/metal/*.mm only: not the SDK, nothing here is ever linked. Signatures
// follow the macOS SDK's Metal headers (MTLTypes.h, MTLDevice.h,
// MTLLibrary.h, MTLArgument.h, MTLFunctionConstantValues.h,
// MTLComputePipeline.h, MTLCommandEncoder.h, MTLComputeCommandEncoder.h,
// MTLResource.h, MTLAllocation.h, MTLBuffer.h, MTLCommandQueue.h,
// MTLCommandBuffer.h, MTLEvent.h); availability and
// deprecation attributes are left out. See test/objc/objc_sdk/README.md.
#pragma once

#include <Foundation/Foundation.h>

NS_ASSUME_NONNULL_BEGIN

@protocol MTLDevice;
@protocol MTLFunction;
@protocol MTLLibrary;
@protocol MTLComputePipelineState;
@protocol MTLCommandBuffer;

// MTLTypes.h
typedef struct {
    NSUInteger width, height, depth;
} MTLSize;

static inline MTLSize MTLSizeMake(NSUInteger width, NSUInteger height, NSUInteger depth) {
    MTLSize size = {width, height, depth};
    return size;
}

// MTLAllocation.h, MTLResource.h, MTLBuffer.h
@protocol MTLAllocation <NSObject>
@end
@protocol MTLResource <MTLAllocation>
@end
@protocol MTLBuffer <MTLResource>
@end

// MTLArgument.h: the MTLDataType values function constants are set with.
typedef NS_ENUM(NSUInteger, MTLDataType) {
    MTLDataTypeFloat = 3,
    MTLDataTypeInt = 29,
    MTLDataTypeUInt = 33,
    MTLDataTypeBool = 53,
};

// MTLFunctionConstantValues.h (macOS 10.12)
@interface MTLFunctionConstantValues : NSObject <NSCopying>
- (void)setConstantValue:(const void *)value type:(MTLDataType)type atIndex:(NSUInteger)index;
- (void)setConstantValue:(const void *)value type:(MTLDataType)type withName:(NSString *)name;
@end

// MTLLibrary.h
@interface MTLFunctionConstant : NSObject
@end

@protocol MTLFunction <NSObject>
@property (readonly) NSDictionary<NSString *, MTLFunctionConstant *> *functionConstantsDictionary;
@end

typedef NS_ENUM(NSUInteger, MTLLanguageVersion) {
    MTLLanguageVersion3_1 = (3 << 16) + 1,
};

// The macOS 15 SDK added MTLMathMode, MTLMathFloatingPointFunctions and the
// two properties; in a macOS 14 SDK they do not exist at all (clang ignores
// availability attributes on Linux, so absence is the faithful model).
#if SDK_SUBSET_MACOS >= 15
typedef NS_ENUM(NSInteger, MTLMathMode) {
    MTLMathModeSafe = 0,
    MTLMathModeRelaxed = 1,
    MTLMathModeFast = 2,
};

typedef NS_ENUM(NSInteger, MTLMathFloatingPointFunctions) {
    MTLMathFloatingPointFunctionsFast = 0,
    MTLMathFloatingPointFunctionsPrecise = 1,
};
#endif

@interface MTLCompileOptions : NSObject <NSCopying>
@property (readwrite, nonatomic) BOOL fastMathEnabled;
#if SDK_SUBSET_MACOS >= 15
@property (readwrite, nonatomic) MTLMathMode mathMode;
@property (readwrite, nonatomic) MTLMathFloatingPointFunctions mathFloatingPointFunctions;
#endif
@property (readwrite, nonatomic) MTLLanguageVersion languageVersion;
@end

@protocol MTLLibrary <NSObject>
- (nullable id <MTLFunction>) newFunctionWithName:(NSString *)functionName;
- (nullable id <MTLFunction>) newFunctionWithName:(NSString *)name constantValues:(MTLFunctionConstantValues *)constantValues error:(__autoreleasing NSError **)error;
@end

// MTLComputePipeline.h
@protocol MTLComputePipelineState <NSObject>
@property (readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@property (readonly) NSUInteger threadExecutionWidth;
@property (readonly) NSUInteger staticThreadgroupMemoryLength;
@end

// MTLDevice.h
@protocol MTLDevice <NSObject>
@property (readonly) NSUInteger maxThreadgroupMemoryLength;
- (nullable id <MTLLibrary>)newLibraryWithSource:(NSString *)source options:(nullable MTLCompileOptions *)options error:(__autoreleasing NSError **)error;
- (nullable id <MTLComputePipelineState>)newComputePipelineStateWithFunction:(id <MTLFunction>)computeFunction error:(__autoreleasing NSError **)error;
@end

// MTLCommandEncoder.h, MTLComputeCommandEncoder.h
@protocol MTLCommandEncoder <NSObject>
@end

@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id <MTLComputePipelineState>)state;
- (void)setBytes:(const void *)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)setBuffer:(nullable id <MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setThreadgroupMemoryLength:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
- (void)dispatchThreads:(MTLSize)threadsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
@end

// MTLCommandQueue.h, MTLCommandBuffer.h, MTLEvent.h: named by PyTorch's
// MPSStream.h only.
@protocol MTLCommandQueue <NSObject>
@end
@protocol MTLCommandBuffer <NSObject>
@end
typedef void (^MTLCommandBufferHandler)(id <MTLCommandBuffer>);
@protocol MTLEvent <NSObject>
@end
@protocol MTLSharedEvent <MTLEvent>
@end

NS_ASSUME_NONNULL_END

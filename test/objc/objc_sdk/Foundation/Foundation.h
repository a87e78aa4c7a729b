// Foundation (Apple), declaration subset for the Linux syntax check of
// csrc/metal/*.mm only: not the SDK, nothing here is ever linked. Signatures
// follow the macOS SDK's Foundation headers (NSObject.h, NSString.h,
// NSError.h, NSDictionary.h, NSObjCRuntime.h); see test/objc/objc_sdk/README.md.
#pragma once

#include <dispatch/dispatch.h>
#include <objc/NSObject.h>

#include <stdint.h>

// Availability.h / AvailabilityInternal.h: the SDK generation under check.
// An SDK defines __MAC_<version> for every release up to its own and sets
// __MAC_OS_X_VERSION_MAX_ALLOWED to its own version; code that uses an API
// newer than the oldest supported SDK guards it with these at compile time
// (a runtime @available check does not make an undeclared API compile).
// check_objc_compile.py passes -DSDK_SUBSET_MACOS=14 or 15.
#ifndef SDK_SUBSET_MACOS
#define SDK_SUBSET_MACOS 15
#endif
#define __MAC_14_0 140000
#if SDK_SUBSET_MACOS >= 15
#define __MAC_15_0 150000
#define __MAC_OS_X_VERSION_MAX_ALLOWED __MAC_15_0
#else
#define __MAC_OS_X_VERSION_MAX_ALLOWED __MAC_14_0
#endif

// NSObjCRuntime.h (LP64)
typedef long NSInteger;
typedef unsigned long NSUInteger;
#define NS_ENUM(...) CF_ENUM(__VA_ARGS__)
#define NS_OPTIONS(_type, _name) enum _name : _type _name; enum _name : _type
// CFAvailability.h: CF_ENUM(type) is an anonymous fixed-type enum,
// CF_ENUM(type, name) also declares the named enum type.
#define SDK_SUBSET_CF_ENUM_GET_MACRO(_1, _2, NAME, ...) NAME
#define SDK_SUBSET_CF_ANON_ENUM(_type) enum : _type
#define SDK_SUBSET_CF_NAMED_ENUM(_type, _name) enum _name : _type _name; enum _name : _type
#define CF_ENUM(...) SDK_SUBSET_CF_ENUM_GET_MACRO(__VA_ARGS__, SDK_SUBSET_CF_NAMED_ENUM, SDK_SUBSET_CF_ANON_ENUM, )(__VA_ARGS__)
#define NS_ASSUME_NONNULL_BEGIN _Pragma("clang assume_nonnull begin")
#define NS_ASSUME_NONNULL_END _Pragma("clang assume_nonnull end")
#define NS_RETURNS_INNER_POINTER __attribute__((objc_returns_inner_pointer))

NS_ASSUME_NONNULL_BEGIN

// NSObject.h
@protocol NSCopying
- (id)copyWithZone:(nullable NSZone *)zone;
@end

// NSString.h
typedef NSUInteger NSStringEncoding;
NS_ENUM(NSStringEncoding) {
    NSUTF8StringEncoding = 4,
};

@interface NSString : NSObject <NSCopying>
+ (nullable instancetype)stringWithUTF8String:(const char *)nullTerminatedCString;
- (nullable instancetype)initWithBytes:(const void *)bytes length:(NSUInteger)len encoding:(NSStringEncoding)encoding;
@property (nullable, readonly) const char *UTF8String NS_RETURNS_INNER_POINTER;
@end

// NSError.h
@interface NSError : NSObject <NSCopying>
@property (readonly, copy) NSString *localizedDescription;
@end

// NSDictionary.h (named by PyTorch's MPSStream.h; count: Metal's
// functionConstantsDictionary)
@interface NSDictionary<__covariant KeyType, __covariant ObjectType> : NSObject <NSCopying>
@property (readonly) NSUInteger count;
@end

NS_ASSUME_NONNULL_END

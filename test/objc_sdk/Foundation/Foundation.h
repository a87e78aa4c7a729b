// Declaration subset of Apple's Foundation (<Foundation/Foundation.h>), for
// the Linux syntax check of my_mps_ops' Objective-C++ sources only: just the
// types and methods they and PyTorch's MPS headers use, with Apple's
// signatures. Not an SDK; nothing here links or runs.
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef unsigned long NSUInteger;
typedef long NSInteger;
typedef signed char BOOL;
#define YES ((BOOL)1)
#define NO ((BOOL)0)
#ifndef nil
#define nil nullptr
#endif
#define NS_ENUM(type, name) enum name : type name; enum name : type
#define NS_OPTIONS(type, name) enum name : type name; enum name : type

@protocol NSObject
- (instancetype)retain;
- (oneway void)release;
- (instancetype)autorelease;
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)new;
+ (instancetype)alloc;
- (instancetype)init;
@end

@interface NSString : NSObject
+ (nullable instancetype)stringWithUTF8String:(const char* _Nonnull)nullTerminatedCString;
@property(nullable, readonly) const char* UTF8String;
@end

@interface NSError : NSObject
@property(readonly, copy) NSString* _Nonnull localizedDescription;
@end

@interface NSDictionary<KeyType, ObjectType> : NSObject
@end

#include <dispatch/dispatch.h>

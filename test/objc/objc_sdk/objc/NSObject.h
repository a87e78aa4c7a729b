// Objective-C runtime (Apple), declaration subset for the Linux syntax check
// of csrc/metal/*.mm only: not the SDK, nothing here is ever linked. Signatures
// follow the macOS SDK's objc/objc.h and objc/NSObject.h (manual
// retain/release declarations included: the .mm files are built without
// ARC); see test/objc/objc_sdk/README.md.
#pragma once

// objc/objc.h: BOOL is `bool` on arm64 macOS (OBJC_BOOL_IS_BOOL).
typedef bool BOOL;
#define YES __objc_yes
#define NO __objc_no
#ifndef nil
#define nil nullptr
#endif

typedef struct _NSZone NSZone;

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

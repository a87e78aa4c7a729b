// libdispatch (Apple), declaration subset for the Linux syntax check of
// csrc/metal/*.mm only: not the SDK, nothing here is ever linked. Signatures
// follow the macOS SDK's dispatch/object.h, dispatch/queue.h and os/object.h
// as seen from Objective-C (OS_OBJECT_USE_OBJC: dispatch objects are
// Objective-C objects); see test/objc/objc_sdk/README.md.
#pragma once

#include <objc/NSObject.h>

// os/object.h OS_OBJECT_DECL_CLASS / dispatch/object.h DISPATCH_DECL
@protocol OS_dispatch_object <NSObject>
@end
@protocol OS_dispatch_queue <OS_dispatch_object>
@end
typedef NSObject<OS_dispatch_queue> *dispatch_queue_t;

typedef void (^dispatch_block_t)(void);

// queue.h
#ifdef __cplusplus
extern "C" {
#endif
void dispatch_sync(dispatch_queue_t queue, __attribute__((__noescape__)) dispatch_block_t block)
    __attribute__((__nonnull__)) __attribute__((__nothrow__));

#ifdef __cplusplus
}
#endif

// Declaration subset of Apple's libdispatch (<dispatch/dispatch.h>), for the
// Linux syntax check of my_mps_ops' Objective-C++ sources only: just what
// they and PyTorch's MPS headers use, with Apple's signatures. Not an SDK.
#pragma once

#ifdef __OBJC__
@protocol OS_dispatch_object
@end
@protocol OS_dispatch_queue <OS_dispatch_object>
@end
typedef NSObject<OS_dispatch_queue>* dispatch_queue_t;
#else
typedef struct dispatch_queue_s* dispatch_queue_t;
#endif

typedef void (^dispatch_block_t)(void);

#ifdef __cplusplus
extern "C" {
#endif
void dispatch_sync(dispatch_queue_t queue, __attribute__((noescape)) dispatch_block_t block);
#ifdef __cplusplus
}
#endif

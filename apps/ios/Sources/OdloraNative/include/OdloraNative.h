// The native runtime (runtime/native) for Swift: an Objective-C face over odlora::Engine.
#import <Foundation/Foundation.h>

NS_ASSUME_NONNULL_BEGIN

@interface OdloraNativeRuntime : NSObject
/// Verifies the bundle at `path` (sha256 of every file) and loads its ExecuTorch base once.
- (nullable instancetype)initWithBundle:(NSString*)path error:(NSError**)error;
/// Verifies an adapter bundle against the base and registers its adapters.
- (BOOL)addAdapterBundle:(NSString*)path error:(NSError**)error;
@property(nonatomic, readonly) NSArray<NSString*>* adapterIds;
/// The ExecuTorch delegate the base runs on (bundle.json's "delegate": "xnnpack", "coreml", ...); its
/// backend must be linked into the app, or initWithBundle fails naming it.
@property(nonatomic, readonly) NSString* delegate;
/// Greedy answer, asked as the adapter was trained (the chat template, or raw text for a "raw"
/// adapter); `adapter` nil is the base.
- (nullable NSString*)generate:(NSString*)prompt adapter:(nullable NSString*)adapter
                  maxNewTokens:(NSInteger)maxNewTokens error:(NSError**)error;
@end

NS_ASSUME_NONNULL_END

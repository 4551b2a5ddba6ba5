#import "OdloraNative.h"

#include <memory>

#include "engine.hpp"  // runtime/native/src, added to this target's header search path (README)

static NSError* ToError(const std::exception& e) {
  return [NSError errorWithDomain:@"odlora" code:2 userInfo:@{NSLocalizedDescriptionKey : @(e.what())}];
}

@implementation OdloraNativeRuntime {
  std::unique_ptr<odlora::Engine> _engine;
}

- (nullable instancetype)initWithBundle:(NSString*)path error:(NSError**)error {
  if ((self = [super init])) {
    try {
      _engine = std::make_unique<odlora::Engine>(path.UTF8String);
    } catch (const std::exception& e) {
      if (error) *error = ToError(e);
      return nil;
    }
  }
  return self;
}

- (BOOL)addAdapterBundle:(NSString*)path error:(NSError**)error {
  try {
    _engine->add_adapter_bundle(path.UTF8String);
    return YES;
  } catch (const std::exception& e) {
    if (error) *error = ToError(e);
    return NO;
  }
}

- (NSArray<NSString*>*)adapterIds {
  NSMutableArray* ids = [NSMutableArray array];
  for (const auto& id : _engine->adapter_ids()) [ids addObject:@(id.c_str())];
  return ids;
}

- (NSString*)delegate {
  return @(_engine->delegate().c_str());
}

- (nullable NSString*)generate:(NSString*)prompt adapter:(nullable NSString*)adapter
                  maxNewTokens:(NSInteger)maxNewTokens error:(NSError**)error {
  try {
    const auto g = _engine->generate(prompt.UTF8String, adapter ? adapter.UTF8String : "", int(maxNewTokens));
    return [[NSString alloc] initWithBytes:g.text.data() length:g.text.size() encoding:NSUTF8StringEncoding] ?: @"";
  } catch (const std::exception& e) {
    if (error) *error = ToError(e);
    return nil;
  }
}

@end

//! Firecracker's `RateLimiter` and `TokenBucket` bodies (on drives, network
//! interfaces and the entropy device), and the entropy device's body.

use flatlet_devices::rate_limiter::{BucketConfig, BucketUpdate, RateLimiter};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// A token bucket: `size` tokens, refilled over `refill_time` ms, and a
/// `one_time_burst` spent first. A size or refill time of 0 means no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens in a full bucket.
    pub size: u64,
    /// Tokens spent once, before the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    fn bucket(&self) -> Option<BucketConfig> {
        (self.size > 0 && self.refill_time > 0).then_some(BucketConfig {
            size: self.size,
            one_time_burst: self.one_time_burst.unwrap_or(0),
            refill_time_ms: self.refill_time,
        })
    }

    fn update(c: Option<&Self>) -> BucketUpdate {
        match c.map(Self::bucket) {
            None => BucketUpdate::Keep,
            Some(None) => BucketUpdate::Remove,
            Some(Some(b)) => BucketUpdate::Set(b),
        }
    }
}

/// Limits on bytes (`bandwidth`) and operations (`ops`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// Refill times over this are refused (a day): a typo, not a limit.
const MAX_REFILL_MS: u64 = 24 * 3600 * 1000;

impl RateLimiterConfig {
    /// Checks the buckets.
    pub fn validate(&self, what: &str) -> Result<(), ConfigError> {
        for b in [self.bandwidth, self.ops].into_iter().flatten() {
            if b.refill_time > MAX_REFILL_MS {
                return Err(ConfigError::InvalidDevice(format!(
                    "{what}: refill_time {} ms is more than a day",
                    b.refill_time
                )));
            }
        }
        Ok(())
    }

    /// The device-side limiter (one with no bucket when `config` is None,
    /// so that a `PATCH` can limit the device later).
    pub fn build(config: Option<&Self>) -> std::io::Result<RateLimiter> {
        let c = config.copied().unwrap_or_default();
        RateLimiter::new(
            c.bandwidth.as_ref().and_then(TokenBucketConfig::bucket),
            c.ops.as_ref().and_then(TokenBucketConfig::bucket),
        )
    }

    /// What a `PATCH` with this body does: buckets given are replaced
    /// (removed when their size or refill time is 0), others kept.
    pub fn updates(&self) -> (BucketUpdate, BucketUpdate) {
        (
            TokenBucketConfig::update(self.bandwidth.as_ref()),
            TokenBucketConfig::update(self.ops.as_ref()),
        )
    }

    /// This limiter with a `PATCH`'s buckets applied (for `GET /vm/config`).
    pub fn patched(current: Option<&Self>, update: &Self) -> Self {
        let mut c = current.copied().unwrap_or_default();
        if update.bandwidth.is_some() {
            c.bandwidth = update.bandwidth;
        }
        if update.ops.is_some() {
            c.ops = update.ops;
        }
        c
    }
}

/// `PUT /entropy`, and `entropy` in a config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Limits on the bytes and requests the guest gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyConfig {
    /// Checks the body.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.rate_limiter {
            Some(r) => r.validate("entropy rate_limiter"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_bodies() {
        let r: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1000, "one_time_burst": 5000, "refill_time": 100},
                "ops": {"size": 10, "refill_time": 1000}}"#,
        )
        .unwrap();
        assert_eq!(r.bandwidth.unwrap().bucket().unwrap().one_time_burst, 5000);
        assert_eq!(r.ops.unwrap().bucket().unwrap().size, 10);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bandwidth": {"size": 1}}"#).is_err());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"iops": {}}"#).is_err());
        let off = TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 100,
        };
        let u = RateLimiterConfig {
            bandwidth: Some(off),
            ops: None,
        };
        assert_eq!(u.updates(), (BucketUpdate::Remove, BucketUpdate::Keep));
        let e: EntropyConfig =
            serde_json::from_str(r#"{"rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}"#).unwrap();
        e.validate().unwrap();
        let slow = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: MAX_REFILL_MS + 1,
            }),
            ops: None,
        };
        assert!(slow.validate("x").is_err());
    }
}

//! The authoritative in-memory ledger.

/// One of an account's two balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Anytime,
    OffPeak,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Anytime => "anytime",
            Bucket::OffPeak => "offpeak",
        }
    }
}

/// Which buckets a send may draw from (decided by the tariff's off-peak
/// windows at the time of the send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketPreference {
    /// Outside off-peak windows: only `anytime` pays.
    AnytimeOnly,
    /// Inside an off-peak window: `offpeak` first, then `anytime`.
    OffPeakFirst,
}

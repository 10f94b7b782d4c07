//! How fetched bytes are checked (`--verify`), and what the service has shown it offers.
//!
//! Two kinds of check exist. A blob uploaded in one piece carries a Content-MD5 of the
//! whole: the fill hashes its file once every chunk is in, and a mismatch drops the copy and
//! fails later reads (bytes read before the end were served as fetched, so the read never
//! waits for the hash). The service can also checksum each ranged answer (ranges of at most
//! 4 MiB): CRC64 (`x-ms-range-get-content-crc64`, Azure; cheap to check, about 0.1 CPU-s per
//! GiB with carry-less multiply) or MD5 (`x-ms-range-get-content-md5`, also Azurite; about
//! 1.3 CPU-s per GiB here). A range is checked before anyone reads it, and one that fails
//! (corrupted on the way) is fetched again.
//!
//! - `none`: nothing is checked.
//! - `md5`: the whole-blob Content-MD5 where the blob has one, else MD5 per range.
//! - `crc64`: CRC64 per range; where the service leaves it out of its answer, the whole-blob
//!   Content-MD5 where there is one.
//! - `auto` (the default): CRC64 per range while the service offers it (the first answer
//!   tells), else as `md5`. Every fetched byte is checked whenever the service allows it.
//!
//! What each protects against: bytes changed between the service's storage and this
//! cache (a proxy, a NIC, a kernel bug, a middlebox). TLS covers the wire, not what
//! happens around it. Only the whole-blob Content-MD5 also catches a blob stored other
//! than its uploader hashed it; `auto` skips that hash where every range was checked.

pub use crate::blob::Checksum;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// The largest range the service checksums.
pub const RANGE_SUM_MAX: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verify {
    #[default]
    Auto,
    Md5,
    Crc64,
    None,
}

impl FromStr for Verify {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Verify::Auto),
            "md5" => Ok(Verify::Md5),
            "crc64" => Ok(Verify::Crc64),
            "none" => Ok(Verify::None),
            _ => Err(format!(
                "{s:?} is not a verification: auto, md5, crc64 or none"
            )),
        }
    }
}

/// What one fill checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Asked of the service for every range (chunks are then at most `RANGE_SUM_MAX`).
    pub per_range: Option<Checksum>,
    /// The whole file against the blob's Content-MD5, once complete.
    pub whole_md5: bool,
}

const UNKNOWN: u8 = 0;
const OFFERED: u8 = 1;
const OMITTED: u8 = 2;

/// The mount's choice and what the service has shown about CRC64.
#[derive(Debug, Default)]
pub struct Verifier {
    mode: Verify,
    crc64: AtomicU8,
}

impl Verifier {
    pub fn new(mode: Verify) -> Verifier {
        Verifier {
            mode,
            crc64: AtomicU8::new(UNKNOWN),
        }
    }

    pub fn mode(&self) -> Verify {
        self.mode
    }

    /// The checks for a blob; `has_md5`: it carries a Content-MD5.
    pub fn plan(&self, has_md5: bool) -> Plan {
        let md5 = Plan {
            per_range: (!has_md5).then_some(Checksum::Md5),
            whole_md5: has_md5,
        };
        let crc64 = Plan {
            per_range: Some(Checksum::Crc64),
            // Kept for a range the service answers without its CRC64 (see `omitted`).
            whole_md5: has_md5,
        };
        match self.mode {
            Verify::None => Plan {
                per_range: None,
                whole_md5: false,
            },
            Verify::Md5 => md5,
            Verify::Crc64 => crc64,
            Verify::Auto => match self.crc64.load(Ordering::Relaxed) {
                OMITTED => md5,
                _ => crc64,
            },
        }
    }

    /// An answer asked for `sum` came with it (true) or without it.
    pub fn answered(&self, sum: Checksum, with: bool) {
        if sum != Checksum::Crc64 {
            return;
        }
        let now = if with { OFFERED } else { OMITTED };
        let was = self.crc64.swap(now, Ordering::Relaxed);
        if !with && was != OMITTED {
            tracing::info!(
                "the service answers ranged reads without a CRC64: data is checked with the blob's Content-MD5, or MD5 per range (--verify {})",
                self.mode
            );
        }
    }
}

impl std::fmt::Display for Verify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verify::Auto => "auto",
            Verify::Md5 => "md5",
            Verify::Crc64 => "crc64",
            Verify::None => "none",
        })
    }
}

/// A running checksum of one range, fed its pieces in order.
pub enum Running {
    Md5(md5::Md5),
    Crc64(crc64fast_nvme::Digest),
}

impl Running {
    pub fn new(sum: Checksum) -> Running {
        use md5::Digest as _;
        match sum {
            Checksum::Md5 => Running::Md5(md5::Md5::new()),
            Checksum::Crc64 => Running::Crc64(crc64fast_nvme::Digest::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        use md5::Digest as _;
        match self {
            Running::Md5(h) => h.update(data),
            Running::Crc64(h) => h.write(data),
        }
    }

    /// The checksum as the service sends it: MD5's 16 bytes; CRC64's 8, little-endian
    /// (`x-ms-content-crc64`, base64-decoded).
    pub fn finish(self) -> Vec<u8> {
        use md5::Digest as _;
        match self {
            Running::Md5(h) => h.finalize().to_vec(),
            Running::Crc64(h) => h.sum64().to_le_bytes().to_vec(),
        }
    }
}

/// The service's checksum of `data` (what the in-memory store answers with).
pub fn sum_of(sum: Checksum, data: &[u8]) -> Vec<u8> {
    let mut r = Running::new(sum);
    r.update(data);
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_is_azures_crc64_nvme_with_its_check_value() {
        // CRC-64/NVME's check value (Azure Storage's polynomial 0x9A6C9329AC4BC9B5,
        // reflected, initial and final complement).
        assert_eq!(
            sum_of(Checksum::Crc64, b"123456789"),
            0xae8b14860a799888u64.to_le_bytes().to_vec()
        );
        assert_eq!(sum_of(Checksum::Crc64, b""), vec![0u8; 8]);
    }

    #[test]
    fn auto_uses_crc64_until_the_service_leaves_it_out() {
        let v = Verifier::new(Verify::Auto);
        assert_eq!(v.plan(false).per_range, Some(Checksum::Crc64));
        v.answered(Checksum::Crc64, false);
        assert_eq!(
            v.plan(false),
            Plan {
                per_range: Some(Checksum::Md5),
                whole_md5: false
            }
        );
        assert_eq!(
            v.plan(true),
            Plan {
                per_range: None,
                whole_md5: true
            }
        );
        let none = Verifier::new(Verify::None);
        assert_eq!(none.plan(true).per_range, None);
        assert!(!none.plan(true).whole_md5);
        assert!("sha1".parse::<Verify>().is_err());
        assert_eq!("crc64".parse::<Verify>(), Ok(Verify::Crc64));
    }
}

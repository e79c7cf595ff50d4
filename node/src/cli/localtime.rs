//! Unix milliseconds as local wall-clock time for people: `2026-05-02 14:03:07.412 +02:00`.
//!
//! The offset comes from the zone file the C library would use (`TZ=:/path` or a zone name
//! under /usr/share/zoneinfo, else /etc/localtime), read here because std has no local time
//! and the `time` crate's local offset needs crates this build does not have. Instants past
//! the file's last transition take that transition's offset (a zone whose future rules live
//! only in the file's footer may then be an hour off in summer); with no readable zone file
//! the time is shown in UTC (`Z`).

use std::path::{Path, PathBuf};

/// One zone: transition instants (Unix s, ascending) and the UTC offset (s) from each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    transitions: Vec<(i64, i32)>,
    /// The offset before the first transition (or always, with none).
    initial: i32,
}

impl Zone {
    /// The zone of this process (see the module doc); UTC when none can be read.
    pub fn local() -> Self {
        zone_file()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| Self::parse(&b))
            .unwrap_or_default()
    }

    /// Parses a TZif file (versions 1 to 4); `None` if it is not one.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let header = Header::read(bytes)?;
        if header.version >= b'2' {
            // Skip the version 1 block; the second has 64-bit times.
            let rest = bytes.get(44 + header.block_len(4)?..)?;
            let h2 = Header::read(rest)?;
            return h2.zone(rest.get(44..)?, 8);
        }
        header.zone(bytes.get(44..)?, 4)
    }

    /// The offset from UTC, seconds, at `unix_s`.
    pub fn offset_at(&self, unix_s: i64) -> i32 {
        match self.transitions.partition_point(|(t, _)| *t <= unix_s) {
            0 => self.initial,
            i => self
                .transitions
                .get(i - 1)
                .map_or(self.initial, |(_, o)| *o),
        }
    }

    /// `YYYY-MM-DD HH:MM:SS.mmm ±HH:MM` (RFC 3339 with a space) for Unix ms `ms`.
    pub fn format_ms(&self, ms: u64) -> String {
        let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX / 2);
        let offset = self.offset_at(secs);
        let local = secs + i64::from(offset);
        let (days, of_day) = (local.div_euclid(86_400), local.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        let zone = if offset == 0 {
            "Z".to_owned()
        } else {
            let sign = if offset < 0 { '-' } else { '+' };
            let a = offset.unsigned_abs();
            format!("{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)
        };
        format!(
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} {zone}",
            of_day / 3600,
            of_day % 3600 / 60,
            of_day % 60,
            ms % 1000
        )
    }
}

/// The zone file: `TZ` (`:/abs/path`, `/abs/path` or a name under /usr/share/zoneinfo),
/// else /etc/localtime.
fn zone_file() -> Option<PathBuf> {
    match std::env::var("TZ") {
        Ok(tz) if !tz.is_empty() => {
            let tz = tz.trim_start_matches(':');
            if Path::new(tz).is_absolute() {
                Some(tz.into())
            } else if tz.contains("..") {
                None
            } else {
                Some(Path::new("/usr/share/zoneinfo").join(tz))
            }
        }
        _ => Some("/etc/localtime".into()),
    }
}

struct Header {
    version: u8,
    isutcnt: usize,
    isstdcnt: usize,
    leapcnt: usize,
    timecnt: usize,
    typecnt: usize,
    charcnt: usize,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Header {
    fn read(b: &[u8]) -> Option<Self> {
        if b.get(..4)? != b"TZif" {
            return None;
        }
        let n = |i: usize| -> Option<usize> { usize::try_from(be32(b, 20 + 4 * i)?).ok() };
        Some(Self {
            version: *b.get(4)?,
            isutcnt: n(0)?,
            isstdcnt: n(1)?,
            leapcnt: n(2)?,
            timecnt: n(3)?,
            typecnt: n(4)?,
            charcnt: n(5)?,
        })
    }

    /// The length of the data block after this header, with `time_len`-byte times.
    fn block_len(&self, time_len: usize) -> Option<usize> {
        self.timecnt
            .checked_mul(time_len + 1)?
            .checked_add(self.typecnt.checked_mul(6)?)?
            .checked_add(self.charcnt)?
            .checked_add(self.leapcnt.checked_mul(time_len + 4)?)?
            .checked_add(self.isstdcnt)?
            .checked_add(self.isutcnt)
    }

    fn zone(&self, data: &[u8], time_len: usize) -> Option<Zone> {
        if self.typecnt == 0 {
            return None;
        }
        let times = data.get(..self.timecnt * time_len)?;
        let idx = data.get(self.timecnt * time_len..self.timecnt * (time_len + 1))?;
        let types_at = self.timecnt * (time_len + 1);
        let offset_of = |i: usize| -> Option<i32> {
            let at = types_at + 6 * i;
            Some(i32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        let mut transitions = Vec::with_capacity(self.timecnt);
        for (k, i) in idx.iter().enumerate() {
            let raw = times.get(k * time_len..(k + 1) * time_len)?;
            let t = if time_len == 8 {
                i64::from_be_bytes(raw.try_into().ok()?)
            } else {
                i64::from(i32::from_be_bytes(raw.try_into().ok()?))
            };
            transitions.push((t, offset_of(usize::from(*i))?));
        }
        Some(Zone {
            transitions,
            initial: offset_of(0)?,
        })
    }
}

/// Year, month, day of the day `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A duration in ms as `+1.2 s` (`+2 m 05 s` past a minute).
pub fn offset_text(ms: i64) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let a = ms.unsigned_abs();
    if a < 60_000 {
        format!("{sign}{:.1} s", a as f64 / 1000.0)
    } else {
        format!("{sign}{} m {:02} s", a / 60_000, a % 60_000 / 1000)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A version 2 TZif of a zone at +01:00, then +02:00 from Unix 1000.
    fn two_offsets() -> Vec<u8> {
        let block = |time_len: usize| -> Vec<u8> {
            let mut b = b"TZif2".to_vec();
            b.extend_from_slice(&[0; 15]);
            for n in [0u32, 0, 0, 1, 2, 4] {
                b.extend_from_slice(&n.to_be_bytes());
            }
            if time_len == 8 {
                b.extend_from_slice(&1000i64.to_be_bytes());
            } else {
                b.extend_from_slice(&1000i32.to_be_bytes());
            }
            b.push(1);
            for off in [3600i32, 7200] {
                b.extend_from_slice(&off.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
            }
            b.extend_from_slice(b"AB\0\0");
            b
        };
        let mut all = block(4);
        all.extend(block(8));
        all.extend_from_slice(b"\nXYZ-2\n");
        all
    }

    #[test]
    fn a_zone_file_gives_the_offset_of_each_instant() {
        let z = Zone::parse(&two_offsets()).unwrap();
        assert_eq!(z.offset_at(0), 3600);
        assert_eq!(z.offset_at(999), 3600);
        assert_eq!(z.offset_at(1000), 7200);
        assert_eq!(z.format_ms(1_500), "1970-01-01 01:00:01.500 +01:00");
        assert_eq!(z.format_ms(2_000_250), "1970-01-01 02:33:20.250 +02:00");
        assert!(Zone::parse(b"not a zone").is_none());
    }

    #[test]
    fn utc_dates_and_offsets() {
        let utc = Zone::default();
        assert_eq!(utc.format_ms(0), "1970-01-01 00:00:00.000 Z");
        // 2024-02-29 12:34:56.789 UTC: a leap day.
        assert_eq!(
            utc.format_ms(1_709_210_096_789),
            "2024-02-29 12:34:56.789 Z"
        );
        assert_eq!(offset_text(1_234), "+1.2 s");
        assert_eq!(offset_text(0), "+0.0 s");
        assert_eq!(offset_text(125_000), "+2 m 05 s");
        assert_eq!(offset_text(-300), "-0.3 s");
    }
}

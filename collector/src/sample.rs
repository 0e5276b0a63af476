//! Host metrics from /proc: pure parsers over `&str` (unit-tested on fixed text) and a [`Sampler`]
//! that reads the files, remembers the previous CPU reading and assembles a [`Sample`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use schema::samples::truncate_to_micros;
use schema::{Disk, NetIface, Sample};

/// Why a sample could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// A /proc file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A /proc file did not look as expected.
    #[error("cannot parse {file}: {message}")]
    Parse {
        /// Which file (`stat`, `meminfo`, ...).
        file: &'static str,
        /// What was wrong.
        message: String,
    },
}

fn parse_err(file: &'static str, message: impl Into<String>) -> SampleError {
    SampleError::Parse {
        file,
        message: message.into(),
    }
}

/// Aggregate CPU time counters from the `cpu` line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks spent doing anything but idling or waiting for I/O.
    pub busy: u64,
    /// All ticks.
    pub total: u64,
}

/// Parses the aggregate `cpu` line of /proc/stat.
pub fn parse_stat(text: &str) -> Result<CpuTimes, SampleError> {
    let line = text
        .lines()
        .find(|l| l.split_ascii_whitespace().next() == Some("cpu"))
        .ok_or_else(|| parse_err("stat", "no aggregate `cpu` line"))?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already part
    // of user/nice, so only the first eight count.
    let mut fields = [0u64; 8];
    let mut n = 0;
    for (i, word) in line.split_ascii_whitespace().skip(1).take(8).enumerate() {
        fields[i] = word
            .parse()
            .map_err(|_| parse_err("stat", format!("`{word}` is not a tick count")))?;
        n += 1;
    }
    if n < 4 {
        return Err(parse_err("stat", "the `cpu` line has fewer than 4 counters"));
    }
    let total = fields.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let idle = fields[3].saturating_add(fields[4]);
    Ok(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// CPU utilisation in percent between two readings; None when no time passed or a counter went
/// backwards (a wrapped or reset counter says nothing about the interval).
pub fn cpu_percent(prev: CpuTimes, cur: CpuTimes) -> Option<f64> {
    let total = cur.total.checked_sub(prev.total)?;
    let busy = cur.busy.checked_sub(prev.busy)?;
    if total == 0 {
        return None;
    }
    Some((busy as f64 * 100.0 / total as f64).clamp(0.0, 100.0))
}

/// The three load averages of /proc/loadavg.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadAvg {
    /// Over 1 minute.
    pub load1: f64,
    /// Over 5 minutes.
    pub load5: f64,
    /// Over 15 minutes.
    pub load15: f64,
}

/// Parses /proc/loadavg (`0.50 0.25 0.12 2/345 6789`).
pub fn parse_loadavg(text: &str) -> Result<LoadAvg, SampleError> {
    let mut it = text.split_ascii_whitespace();
    let mut next = |what: &str| -> Result<f64, SampleError> {
        let word = it
            .next()
            .ok_or_else(|| parse_err("loadavg", format!("missing the {what} load average")))?;
        match word.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(parse_err("loadavg", format!("`{word}` is not a load average"))),
        }
    };
    Ok(LoadAvg {
        load1: next("1-minute")?,
        load5: next("5-minute")?,
        load15: next("15-minute")?,
    })
}

/// Memory and swap from /proc/meminfo, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// MemTotal.
    pub mem_total: u64,
    /// MemTotal minus MemAvailable (what `free` calls used, counting caches as free).
    pub mem_used: u64,
    /// SwapTotal.
    pub swap_total: u64,
    /// SwapTotal minus SwapFree.
    pub swap_used: u64,
}

/// Parses /proc/meminfo. Kernels older than 3.14 lack MemAvailable: free + buffers + cached stands in.
pub fn parse_meminfo(text: &str) -> Result<Memory, SampleError> {
    let mut kb: HashMap<&str, u64> = HashMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_ascii_whitespace();
        let (Some(num), unit) = (words.next(), words.next()) else {
            continue;
        };
        let v: u64 = num
            .parse()
            .map_err(|_| parse_err("meminfo", format!("`{key}` has a non-numeric value `{num}`")))?;
        // Every size is in kB; the few unitless lines (HugePages_*) are counts we do not use.
        if unit == Some("kB") {
            kb.insert(key.trim(), v.saturating_mul(1024));
        }
    }
    let get = |k: &str| {
        kb.get(k)
            .copied()
            .ok_or_else(|| parse_err("meminfo", format!("no `{k}` line")))
    };
    let mem_total = get("MemTotal")?;
    let available = match get("MemAvailable") {
        Ok(v) => v,
        Err(_) => get("MemFree")?
            .saturating_add(kb.get("Buffers").copied().unwrap_or(0))
            .saturating_add(kb.get("Cached").copied().unwrap_or(0)),
    };
    let swap_total = kb.get("SwapTotal").copied().unwrap_or(0);
    let swap_free = kb.get("SwapFree").copied().unwrap_or(swap_total);
    Ok(Memory {
        mem_total,
        mem_used: mem_total.saturating_sub(available),
        swap_total,
        swap_used: swap_total.saturating_sub(swap_free),
    })
}

/// One line of /proc/mounts that names a filesystem worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device (`/dev/sda1`, `overlay`, `server:/export`).
    pub device: String,
    /// The mount point, with the kernel's octal escapes decoded.
    pub mount: String,
    /// The filesystem type.
    pub fs_type: String,
}

/// Filesystems that hold no disk space of their own (kernel interfaces and RAM).
const VIRTUAL_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Parses /proc/mounts into the filesystems to report, like `df`: virtual filesystems are skipped,
/// and a device mounted several times (bind mounts) is reported once, at its shortest mount point.
/// The result is sorted by mount point.
pub fn parse_mounts(text: &str) -> Result<Vec<Mount>, SampleError> {
    let mut by_key: HashMap<String, Mount> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let (Some(device), Some(mount), Some(fs_type)) = (words.next(), words.next(), words.next()) else {
            return Err(parse_err(
                "mounts",
                format!("line {} has fewer than 3 fields", n + 1),
            ));
        };
        if VIRTUAL_FS.contains(&fs_type) {
            continue;
        }
        let m = Mount {
            device: unescape_octal(device),
            mount: unescape_octal(mount),
            fs_type: fs_type.to_string(),
        };
        // Only a real block device can be the same filesystem at two places; `overlay` or `none`
        // name many different filesystems.
        let key = if m.device.starts_with('/') {
            m.device.clone()
        } else {
            m.mount.clone()
        };
        match by_key.get(&key) {
            Some(old) if old.mount.len() <= m.mount.len() => {}
            _ => {
                by_key.insert(key, m);
            }
        }
    }
    let mut out: Vec<Mount> = by_key.into_values().collect();
    out.sort_by(|a, b| a.mount.cmp(&b.mount));
    Ok(out)
}

/// Decodes the `\040`-style escapes the kernel writes for spaces, tabs, newlines and backslashes.
fn unescape_octal(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = (oct[0] - b'0') as u32 * 64 + (oct[1] - b'0') as u32 * 8 + (oct[2] - b'0') as u32;
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/net/dev into per-interface byte counters, in file order.
pub fn parse_net_dev(text: &str) -> Result<Vec<NetIface>, SampleError> {
    let mut out = Vec::new();
    // The first two lines are headers; every other line is `iface: 16 counters`.
    for line in text.lines().skip(2) {
        if line.trim().is_empty() {
            continue;
        }
        let (name, counters) = line
            .split_once(':')
            .ok_or_else(|| parse_err("net/dev", format!("no `:` in `{}`", line.trim())))?;
        let nums: Vec<&str> = counters.split_ascii_whitespace().collect();
        if nums.len() < 9 {
            return Err(parse_err(
                "net/dev",
                format!(
                    "interface `{}` has {} counters, expected 16",
                    name.trim(),
                    nums.len()
                ),
            ));
        }
        let num = |i: usize| -> Result<u64, SampleError> {
            nums[i].parse().map_err(|_| {
                parse_err(
                    "net/dev",
                    format!("interface `{}`: `{}` is not a counter", name.trim(), nums[i]),
                )
            })
        };
        out.push(NetIface {
            iface: name.trim().to_string(),
            rx_bytes: num(0)?,
            tx_bytes: num(8)?,
        });
    }
    Ok(out)
}

/// Parses /proc/uptime (`seconds-up idle-seconds`).
pub fn parse_uptime(text: &str) -> Result<f64, SampleError> {
    let word = text
        .split_ascii_whitespace()
        .next()
        .ok_or_else(|| parse_err("uptime", "the file is empty"))?;
    match word.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(parse_err(
            "uptime",
            format!("`{word}` is not a number of seconds"),
        )),
    }
}

/// Parses /proc/sys/kernel/hostname.
pub fn parse_hostname(text: &str) -> Result<String, SampleError> {
    let name = text.trim();
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(parse_err(
            "sys/kernel/hostname",
            format!("`{name}` is not a host name"),
        ));
    }
    Ok(name.to_string())
}

/// Counts process directories (all-digit names) among the entries of /proc.
pub fn count_processes<'a>(names: impl IntoIterator<Item = &'a str>) -> u32 {
    let n = names
        .into_iter()
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Reads /proc (or a copy of it, for tests) and turns readings into samples.
#[derive(Debug)]
pub struct Sampler {
    proc_root: PathBuf,
    host: String,
    prev_cpu: Option<CpuTimes>,
    last_at: Option<SystemTime>,
}

impl Sampler {
    /// A sampler for `host` reading under `proc_root`.
    pub fn new(proc_root: impl Into<PathBuf>, host: String) -> Self {
        Sampler {
            proc_root: proc_root.into(),
            host,
            prev_cpu: None,
            last_at: None,
        }
    }

    /// The host name this sampler reports.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host name of the machine `proc_root` describes.
    pub fn hostname(proc_root: &Path) -> Result<String, SampleError> {
        parse_hostname(&read(proc_root, "sys/kernel/hostname")?)
    }

    /// Never stamp a sample at or before `t` (e.g. the newest one found in the spool): keeps
    /// (host, sampled_at) unique when the clock steps back.
    pub fn not_before(&mut self, t: SystemTime) {
        if self.last_at.is_none_or(|l| l < t) {
            self.last_at = Some(t);
        }
    }

    /// Takes the CPU reading the first sample's utilisation is measured from.
    pub fn prime(&mut self) -> Result<(), SampleError> {
        self.prev_cpu = Some(parse_stat(&read(&self.proc_root, "stat")?)?);
        Ok(())
    }

    /// Reads every metric now. Blocking (file reads and statvfs): call it off the async threads.
    pub fn sample(&mut self) -> Result<Sample, SampleError> {
        let root = &self.proc_root;
        let cpu = parse_stat(&read(root, "stat")?)?;
        let load = parse_loadavg(&read(root, "loadavg")?)?;
        let mem = parse_meminfo(&read(root, "meminfo")?)?;
        let mounts = parse_mounts(&read(root, "mounts")?)?;
        let net = parse_net_dev(&read(root, "net/dev")?)?;
        let uptime_seconds = parse_uptime(&read(root, "uptime")?)?;
        let process_count = count_process_dirs(root)?;
        let disks = mounts.iter().filter_map(disk_usage).collect();

        let cpu_percent = self.prev_cpu.and_then(|p| cpu_percent(p, cpu));
        self.prev_cpu = Some(cpu);
        let mut at = truncate_to_micros(SystemTime::now());
        if let Some(last) = self.last_at {
            if at <= last {
                at = last + Duration::from_micros(1);
            }
        }
        self.last_at = Some(at);
        Ok(Sample {
            host: self.host.clone(),
            sampled_at: at,
            cpu_percent,
            load1: load.load1,
            load5: load.load5,
            load15: load.load15,
            mem_total_bytes: mem.mem_total,
            mem_used_bytes: mem.mem_used,
            swap_total_bytes: mem.swap_total,
            swap_used_bytes: mem.swap_used,
            disks,
            net,
            uptime_seconds,
            process_count,
        })
    }
}

fn read(root: &Path, name: &str) -> Result<String, SampleError> {
    let path = root.join(name);
    std::fs::read_to_string(&path).map_err(|source| SampleError::Read { path, source })
}

fn count_process_dirs(root: &Path) -> Result<u32, SampleError> {
    let entries = std::fs::read_dir(root).map_err(|source| SampleError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    Ok(count_processes(names.iter().map(String::as_str)))
}

/// `df`'s numbers for one mount; None when it cannot be measured (gone, no permission) or is empty.
fn disk_usage(m: &Mount) -> Option<Disk> {
    let st = match nix::sys::statvfs::statvfs(m.mount.as_str()) {
        Ok(st) => st,
        Err(e) => {
            tracing::debug!(mount = %m.mount, error = %e, "skipping a filesystem statvfs cannot read");
            return None;
        }
    };
    let frsize = st.fragment_size() as u64;
    let blocks = st.blocks() as u64;
    let free = st.blocks_free() as u64;
    let total_bytes = blocks.saturating_mul(frsize);
    if total_bytes == 0 {
        return None;
    }
    Some(Disk {
        mount: m.mount.clone(),
        fs_type: m.fs_type.clone(),
        total_bytes,
        used_bytes: blocks.saturating_sub(free).saturating_mul(frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 50 800 20 3 2 10 7 0\n\
                        cpu0 50 2 25 400 10 1 1 5 3 0\n\
                        intr 12345 0 0\nctxt 999\nprocs_running 2\n";

    #[test]
    fn stat_sums_the_first_eight_counters_and_ignores_guest_time() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(t.total, 100 + 5 + 50 + 800 + 20 + 3 + 2 + 10);
        assert_eq!(t.busy, t.total - 820);
    }

    #[test]
    fn cpu_percent_is_measured_over_the_interval() {
        let a = CpuTimes {
            busy: 100,
            total: 1000,
        };
        let b = CpuTimes {
            busy: 150,
            total: 1200,
        };
        assert_eq!(cpu_percent(a, b), Some(25.0));
        assert_eq!(cpu_percent(a, a), None, "no time passed");
        assert_eq!(cpu_percent(b, a), None, "counters went backwards");
    }

    #[test]
    fn stat_rejects_garbage() {
        assert!(parse_stat("")
            .unwrap_err()
            .to_string()
            .contains("no aggregate `cpu` line"));
        assert!(
            parse_stat("cpu0 1 2 3 4\n").is_err(),
            "per-cpu lines are not the aggregate"
        );
        let e = parse_stat("cpu 1 2 x 4\n").unwrap_err().to_string();
        assert_eq!(e, "cannot parse stat: `x` is not a tick count");
        assert!(parse_stat("cpu 1 2\n")
            .unwrap_err()
            .to_string()
            .contains("fewer than 4"));
        assert!(parse_stat("cpu 1 2 3 -4\n").is_err());
        // Huge counters saturate instead of overflowing.
        let big = format!("cpu {m} {m} {m} {m} {m} {m} {m} {m}\n", m = u64::MAX);
        assert_eq!(parse_stat(&big).unwrap().total, u64::MAX);
    }

    #[test]
    fn loadavg_reads_three_averages() {
        let l = parse_loadavg("3.21 2.33 1.25 6/125 21284\n").unwrap();
        assert_eq!((l.load1, l.load5, l.load15), (3.21, 2.33, 1.25));
        assert!(parse_loadavg("1.0 2.0")
            .unwrap_err()
            .to_string()
            .contains("15-minute"));
        assert!(parse_loadavg("").is_err());
        assert!(parse_loadavg("nan 1 1").is_err());
        assert!(parse_loadavg("-1 1 1").is_err());
    }

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:         1000000 kB\n\
                           MemAvailable:    6000000 kB\nBuffers:          100000 kB\n\
                           Cached:          2000000 kB\nSwapTotal:       2000000 kB\n\
                           SwapFree:        1500000 kB\nHugePages_Total:       0\n";

    #[test]
    fn meminfo_counts_available_memory_as_free() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.mem_total, 8_000_000 * 1024);
        assert_eq!(m.mem_used, 2_000_000 * 1024);
        assert_eq!(m.swap_total, 2_000_000 * 1024);
        assert_eq!(m.swap_used, 500_000 * 1024);
    }

    #[test]
    fn meminfo_without_memavailable_falls_back_to_free_buffers_cached() {
        let text = MEMINFO.replace("MemAvailable:    6000000 kB\n", "");
        let m = parse_meminfo(&text).unwrap();
        assert_eq!(m.mem_used, (8_000_000 - 1_000_000 - 100_000 - 2_000_000) * 1024);
        let no_swap = parse_meminfo("MemTotal: 10 kB\nMemAvailable: 4 kB\n").unwrap();
        assert_eq!((no_swap.swap_total, no_swap.swap_used), (0, 0));
    }

    #[test]
    fn meminfo_rejects_garbage() {
        assert_eq!(
            parse_meminfo("MemFree: 1 kB\n").unwrap_err().to_string(),
            "cannot parse meminfo: no `MemTotal` line"
        );
        assert!(parse_meminfo("MemTotal: lots kB\n")
            .unwrap_err()
            .to_string()
            .contains("`MemTotal` has a non-numeric value `lots`"));
        assert!(
            parse_meminfo("MemTotal: 10 kB\n").is_err(),
            "no free memory figure at all"
        );
    }

    const MOUNTS: &str = "proc /proc proc rw,relatime 0 0\n\
        sysfs /sys sysfs rw,relatime 0 0\n\
        tmpfs /dev/shm tmpfs rw 0 0\n\
        /dev/vda / ext4 rw,relatime 0 0\n\
        /dev/vda /var/lib/docker ext4 rw,relatime 0 0\n\
        /dev/vdb /srv/my\\040data xfs rw 0 0\n\
        overlay /var/lib/docker/overlay2/x/merged overlay rw 0 0\n\
        cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";

    #[test]
    fn mounts_skip_virtual_filesystems_and_bind_mounts() {
        let m = parse_mounts(MOUNTS).unwrap();
        let points: Vec<&str> = m.iter().map(|m| m.mount.as_str()).collect();
        assert_eq!(
            points,
            vec!["/", "/srv/my data", "/var/lib/docker/overlay2/x/merged"]
        );
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[0].device, "/dev/vda");
    }

    #[test]
    fn mounts_reject_short_lines_and_survive_odd_escapes() {
        let e = parse_mounts("/dev/vda /\n").unwrap_err().to_string();
        assert_eq!(e, "cannot parse mounts: line 1 has fewer than 3 fields");
        assert_eq!(unescape_octal("a\\040b"), "a b");
        assert_eq!(
            unescape_octal("a\\0"),
            "a\\0",
            "a truncated escape stays as it is"
        );
        assert_eq!(unescape_octal("a\\999b"), "a\\999b");
        assert_eq!(unescape_octal("end\\"), "end\\");
        assert_eq!(unescape_octal("\\777"), "\\777", "out of byte range");
    }

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit\n \
        face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
        lo: 1141543985   37467    0    0    0     0          0         0 1141543985   37467    0    0    0     0       0          0\n  \
        eth0:12345 10 0 0 0 0 0 0 67890 20 0 0 0 0 0 0\n";

    #[test]
    fn net_dev_reads_rx_and_tx_bytes() {
        let n = parse_net_dev(NET_DEV).unwrap();
        assert_eq!(
            n,
            vec![
                NetIface {
                    iface: "lo".into(),
                    rx_bytes: 1141543985,
                    tx_bytes: 1141543985
                },
                NetIface {
                    iface: "eth0".into(),
                    rx_bytes: 12345,
                    tx_bytes: 67890
                },
            ]
        );
    }

    #[test]
    fn net_dev_rejects_garbage() {
        let head = "h1\nh2\n";
        assert!(parse_net_dev(&format!("{head}eth0 1 2 3\n"))
            .unwrap_err()
            .to_string()
            .contains("no `:`"));
        assert!(parse_net_dev(&format!("{head}eth0: 1 2 3\n"))
            .unwrap_err()
            .to_string()
            .contains("has 3 counters"));
        assert!(parse_net_dev(&format!("{head}eth0: 1 2 3 4 5 6 7 8 x 0 0\n"))
            .unwrap_err()
            .to_string()
            .contains("`x` is not a counter"));
        assert_eq!(parse_net_dev(head).unwrap(), vec![]);
    }

    #[test]
    fn uptime_hostname_and_process_count() {
        assert_eq!(parse_uptime("913.90 598.32\n").unwrap(), 913.90);
        assert!(parse_uptime("").is_err());
        assert!(parse_uptime("soon").is_err());
        assert_eq!(parse_hostname("web-1\n").unwrap(), "web-1");
        assert!(parse_hostname("\n").is_err());
        assert!(parse_hostname("two words").is_err());
        assert_eq!(count_processes(["1", "42", "self", "net", "", "7x", "12345"]), 3);
    }

    #[test]
    fn sampler_reads_this_machine() {
        let mut s = Sampler::new("/proc", "me".into());
        s.prime().unwrap();
        let a = s.sample().unwrap();
        assert!(a.mem_total_bytes > 0);
        assert!(a.process_count > 0);
        assert!(a.disks.iter().any(|d| d.mount == "/"), "{:?}", a.disks);
        let b = s.sample().unwrap();
        assert!(b.sampled_at > a.sampled_at);
        // Even with a clock behind the last stamp, stamps stay strictly increasing.
        s.not_before(SystemTime::now() + Duration::from_secs(3600));
        let c = s.sample().unwrap();
        assert!(c.sampled_at > SystemTime::now() + Duration::from_secs(3000));
    }

    #[test]
    fn sampler_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path(), "x".into());
        let e = s.sample().unwrap_err().to_string();
        assert!(e.starts_with("cannot read ") && e.contains("stat"), "{e}");
    }
}

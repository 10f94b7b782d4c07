//! From the command line to a validated configuration: the source, its credential and the
//! library's `MountConfig`.
//!
//! The source is `az://ACCOUNT/CONTAINER[/PREFIX]` (public cloud, or `--endpoint` for Azurite
//! and other clouds), or `CONTAINER[/PREFIX]` when a connection string names the account.
//! Credentials are resolved once, here, in a documented order, and never read from argv:
//! only from files and environment variables (the variables' names are what the Azure CLI
//! and SDKs use). Environment access goes through a closure so tests can supply their own.

use simfs::blob::auth::{parse_connection_string, Credential, Secret, SecretBytes};
use simfs::mount::{MountConfig, Source};
use std::path::PathBuf;
use url::Url;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// SAS, account key or connection string if configured, else Entra ID (workload identity
    /// when its token file is set, else managed identity).
    Auto,
    Sas,
    AccountKey,
    ManagedIdentity,
    WorkloadIdentity,
    AzureCli,
    ServicePrincipal,
    Anonymous,
}

/// Where the container is and how to reach it.
#[derive(clap::Args, Clone, Debug)]
pub struct SourceArgs {
    /// az://ACCOUNT/CONTAINER[/PREFIX], or CONTAINER[/PREFIX] with a connection string.
    pub source: String,
    /// Blob service endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1 (Azurite) or
    /// https://ACCOUNT.blob.core.usgovcloudapi.net. Default: the public cloud endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub auth: AuthMode,
    /// File holding a SAS token (else $AZURE_STORAGE_SAS_TOKEN).
    #[arg(long)]
    pub sas_token_file: Option<PathBuf>,
    /// File holding the account key (else $AZURE_STORAGE_KEY); simfs signs its own SAS.
    #[arg(long)]
    pub account_key_file: Option<PathBuf>,
    /// File holding a connection string (else $AZURE_STORAGE_CONNECTION_STRING).
    #[arg(long)]
    pub connection_string_file: Option<PathBuf>,
    /// TOML file of secrets (mode 0600): sas_token, account_key, connection_string,
    /// client_secret with tenant_id and client_id. It takes the place of the environment.
    #[arg(long)]
    pub credential_file: Option<PathBuf>,
    /// Client id of a user-assigned managed identity or service principal ($AZURE_CLIENT_ID).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Local directory for the index and cached data (put it on the NVMe).
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Owner of blobs without an `owner` key [default: the mounting user].
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group of blobs without a `group` key [default: the mounting user's group].
    #[arg(long)]
    pub gid: Option<u32>,
    /// Mode of files without a `permissions` key (octal).
    #[arg(long, default_value = "0644", value_parser = parse_octal)]
    pub file_mode: u32,
    /// Mode of directories without a `permissions` key (octal).
    #[arg(long, default_value = "0755", value_parser = parse_octal)]
    pub dir_mode: u32,
    /// List the container again instead of reusing the persisted index.
    #[arg(long)]
    pub reindex: bool,
    /// With no index in the cache directory yet, start from the index snapshot published in
    /// the container (`simfs index publish`) instead of listing it; the refresh then
    /// brings it up to date. Without a usable snapshot the container is listed.
    #[arg(long)]
    pub index_from_container: bool,
    /// List requests in flight at once while indexing.
    #[arg(long, default_value_t = 32)]
    pub list_concurrency: usize,
    /// Mount read-only: nothing is ever written to the container.
    #[arg(long)]
    pub read_only: bool,
    /// mount(8)'s `sync`: every close of a written file waits until its blob is committed in
    /// the container. Without it (`async`, the default) close returns once the file is in the
    /// local journal, and its upload starts at once in the background; fsync, `simfs sync`
    /// and unmount wait for the commit either way.
    #[arg(long)]
    pub sync: bool,
    /// The most closed-but-uncommitted data the mount holds: a size (`64G`, `500M`) or a
    /// share of the cache disk (`10%`). Past it, close waits for uploads to make room. It is
    /// what a wiped cache disk could lose.
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pub max_pending: CacheSize,
    /// The most closed-but-uncommitted files; past it, close waits for uploads.
    #[arg(long, default_value_t = simfs::writeback::DEFAULT_MAX_PENDING_FILES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_files: u64,
    /// How long a metadata change (chmod, rename, mkdir, ...) waits before it is uploaded, so
    /// bursts coalesce (seconds, or `500ms`, `2s`); a written file's upload starts when it is
    /// closed regardless.
    #[arg(long, default_value_t = 1.0, value_parser = parse_delay)]
    pub upload_delay: f64,
    /// How long a writer of a large file (over 8 MiB) may write nothing, the file still
    /// open, before what it has not staged yet, its partial last block included, is staged
    /// ahead of the fsync or close (seconds, or `50ms`); `0` stages only whole blocks the
    /// writer has moved past.
    #[arg(long, default_value_t = 0.05, value_parser = parse_delay)]
    pub stage_when_quiet: f64,
    /// How long a request to the service may go unanswered (seconds, or `30s`, `2m`), plus a
    /// second per MiB it moves, before it fails; what waited for it gets EIO and uploads
    /// are retried.
    #[arg(long, default_value_t = 60.0, value_parser = parse_timeout)]
    pub request_timeout: f64,
    /// Room for clean cached files: bytes (`500M`, `64G`, `2T`) or a share of the cache
    /// disk (`80%`). Least recently used files no one has open are evicted beyond it.
    #[arg(long, default_value = "80%", value_parser = parse_size)]
    pub cache_size: CacheSize,
    /// Free space the clean cache leaves on its disk, for checkpoints being written and for
    /// other users of the disk: bytes (`20G`) or a share of the disk (`5%`). Below it, least
    /// recently used clean files are evicted in the background.
    #[arg(long, default_value = "5%", value_parser = parse_size)]
    pub cache_min_free: CacheSize,
    /// How fetched bytes are checked: `auto` (CRC64 of each range where the service offers
    /// it, else the blob's Content-MD5, else MD5 of each range), `md5` (the Content-MD5,
    /// else MD5 of each range), `crc64` (of each range; the Content-MD5 where the service
    /// leaves it out) or `none`. A range that fails its check is fetched again.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(simfs::cache::verify::Verify))]
    pub verify: simfs::cache::verify::Verify,
    /// The most bytes per second the mount downloads, across all its reads (`100M`, `1G`);
    /// unlimited by default.
    #[arg(long, value_name = "SIZE", value_parser = parse_rate)]
    pub max_download_rate: Option<u64>,
    /// The most bytes per second the mount uploads (`50M`); unlimited by default.
    #[arg(long, value_name = "SIZE", value_parser = parse_rate)]
    pub max_upload_rate: Option<u64>,
    /// The most requests per second the mount sends the service (retries included);
    /// unlimited by default.
    #[arg(long, value_name = "N", value_parser = parse_request_rate)]
    pub max_requests_per_second: Option<f64>,
}

/// A rate in bytes per second: a size with a unit (`100M` is 100 MiB/s); no share.
fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(CacheSize::Bytes(b)) if b > 0 => Ok(b),
        _ => Err(format!(
            "{s:?} is not a rate: give bytes per second with a unit (`500K`, `100M`, `1G`)"
        )),
    }
}

/// A read-ahead: a size with a unit, at most 64 MiB (the kernel's own ceiling is the
/// device's `read_ahead_kb`, which takes far more, but a window that large is wasted on
/// every file read only in part); 0 keeps the kernel's.
pub fn parse_read_ahead(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    match parse_size(s) {
        Ok(CacheSize::Bytes(b)) if b <= 64 << 20 => Ok(b),
        _ => Err(format!(
            "{s:?} is not a read-ahead: give a size up to 64M (`1M`, `4M`), or 0 for the kernel's default"
        )),
    }
}

fn parse_request_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.1 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of requests per second (at least 0.1)"
        )),
    }
}

/// A cache size as given: bytes, or a percentage of the cache disk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheSize {
    Bytes(u64),
    Percent(f64),
}

fn parse_size(s: &str) -> Result<CacheSize, String> {
    let bad = || format!("{s:?} is not a size (500M, 64G, 2T, a number of bytes, or 80%)");
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => Ok(CacheSize::Percent(v)),
            _ => Err(bad()),
        };
    }
    let (num, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(CacheSize::Bytes((v * (1u64 << shift) as f64) as u64))
}

/// Seconds from a plain number (`30`, `1.5`) or a duration with units (`500ms`, `5s`, `2m`,
/// `1h`, `1h30m`), between `min` and `max` seconds; `zero_means` names what 0 does when 0 is
/// allowed below `min`.
pub fn parse_seconds(s: &str, min: f64, max: f64, zero: Option<&str>) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.parse::<f64>() {
        Ok(v) => Some(v),
        Err(_) => humantime::parse_duration(t).ok().map(|d| d.as_secs_f64()),
    };
    let zero_ok = zero.is_some() && v == Some(0.0);
    match v {
        Some(v) if zero_ok || (v.is_finite() && (min..=max).contains(&v)) => Ok(v),
        _ => Err(format!(
            "{s:?} is not {}a duration between {} and {}: give seconds (`30`, `1.5`) or a number with a unit (`500ms`, `5s`, `2m`, `1h`)",
            zero.map(|z| format!("0 ({z}) or ")).unwrap_or_default(),
            humantime::format_duration(std::time::Duration::from_secs_f64(min)),
            humantime::format_duration(std::time::Duration::from_secs_f64(max)),
        )),
    }
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    parse_seconds(s, 1.0, 3600.0, None)
}

fn parse_delay(s: &str) -> Result<f64, String> {
    parse_seconds(s, 0.0, 3600.0, None)
}

fn parse_octal(s: &str) -> Result<u32, String> {
    simfs::blob::format::parse_mode(s).ok_or_else(|| format!("{s:?} is not an octal mode"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Container names: 3-63 of a-z, 0-9 and '-', starting and ending alphanumeric, no "--".
pub fn valid_container_name(c: &str) -> bool {
    if c == "$root" || c == "$web" {
        return true;
    }
    let b = c.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !c.contains("--")
}

/// A file holding a secret must be private to its owner, as the credential file must.
fn check_private(p: &std::path::Path, what: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let shown = p.display();
    let md = std::fs::metadata(p)
        .map_err(|e| ConfigError(format!("cannot read {what} file {shown}: {e}")))?;
    if !md.is_file() {
        return err(format!("{what} file {shown} is not a regular file"));
    }
    if md.mode() & 0o077 != 0 {
        return err(format!(
            "{what} file {shown} is readable by others (mode {:04o}); run: chmod 600 {shown}",
            md.mode() & 0o7777
        ));
    }
    Ok(())
}

fn read_secret_file(p: &PathBuf, what: &str) -> Result<Secret, ConfigError> {
    check_private(p, what)?;
    match std::fs::read_to_string(p) {
        Ok(s) if !s.trim().is_empty() => Ok(Secret::new(s)),
        Ok(_) => err(format!("{what} file {} is empty", p.display())),
        Err(e) => err(format!("cannot read {what} file {}: {e}", p.display())),
    }
}

/// Environment variables that hold secrets: read once, then removed from the daemon's
/// environment (`forget_secrets`).
pub const SECRET_VARS: &[&str] = &[
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
];

/// Removes the secret variables from this process's environment (call while it has a
/// single thread): a daemon's environment is readable in /proc/PID/environ by its owner
/// and root. That file shows the block the process started with, which unsetting a
/// variable leaves as it was, so the values are overwritten there first.
pub fn forget_secrets() {
    extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    // SAFETY: the process has one thread, so nothing reads or changes the environment
    // meanwhile; `environ` is a NULL-terminated array of NUL-terminated strings owned by
    // the process, and each value is overwritten within its own length, NUL kept.
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
            let name_len = text.iter().position(|&b| b == b'=').unwrap_or(text.len());
            if SECRET_VARS
                .iter()
                .any(|k| k.as_bytes() == &text[..name_len])
            {
                let value = (*entry).add(name_len + 1);
                std::ptr::write_bytes(value, b'x', text.len().saturating_sub(name_len + 1));
            }
            entry = entry.add(1);
        }
    }
    for k in SECRET_VARS {
        std::env::remove_var(k);
    }
}

/// Keys of a credential file and the environment variables they stand for.
const CREDENTIAL_KEYS: &[(&str, &str)] = &[
    ("sas_token", "AZURE_STORAGE_SAS_TOKEN"),
    ("account_key", "AZURE_STORAGE_KEY"),
    ("connection_string", "AZURE_STORAGE_CONNECTION_STRING"),
    ("client_secret", "AZURE_CLIENT_SECRET"),
    ("tenant_id", "AZURE_TENANT_ID"),
    ("client_id", "AZURE_CLIENT_ID"),
    ("federated_token_file", "AZURE_FEDERATED_TOKEN_FILE"),
    ("client_certificate_path", "AZURE_CLIENT_CERTIFICATE_PATH"),
    (
        "client_certificate_password",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    ),
];

/// Reads a credential file: private to its owner, TOML, only known keys, string values.
pub fn read_credential_file(p: &std::path::Path) -> Result<Vec<(String, String)>, ConfigError> {
    let shown = p.display();
    check_private(p, "credential")?;
    let text = std::fs::read_to_string(p)
        .map_err(|e| ConfigError(format!("credential file {shown}: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| ConfigError(format!("credential file {shown} is not valid TOML: {e}")))?;
    let mut out = Vec::new();
    for (k, v) in table {
        let Some((_, var)) = CREDENTIAL_KEYS.iter().find(|(key, _)| *key == k) else {
            let known: Vec<&str> = CREDENTIAL_KEYS.iter().map(|(k, _)| *k).collect();
            return err(format!(
                "credential file {shown}: unknown key {k:?} (known: {})",
                known.join(", ")
            ));
        };
        let toml::Value::String(v) = v else {
            return err(format!("credential file {shown}: {k} must be a string"));
        };
        out.push((var.to_string(), v));
    }
    Ok(out)
}

/// Resolves the source and credential from arguments, the credential file and the
/// environment (`env`); a credential file replaces the environment's credentials.
pub fn resolve(
    a: &SourceArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Source, ConfigError> {
    let Some(p) = &a.credential_file else {
        return resolve_with(a, env);
    };
    let from_file = read_credential_file(p)?;
    let overlay = |k: &str| {
        if let Some((_, v)) = from_file.iter().find(|(var, _)| var == k) {
            return Some(v.clone());
        }
        // The file is the whole credential: other credential variables do not mix in.
        let credential_var =
            CREDENTIAL_KEYS.iter().any(|(_, var)| *var == k) || k == "AZURE_STORAGE_ACCOUNT_KEY";
        if credential_var {
            None
        } else {
            env(k)
        }
    };
    resolve_with(a, &overlay)
}

fn resolve_with(
    a: &SourceArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Source, ConfigError> {
    let conn = match (
        &a.connection_string_file,
        env("AZURE_STORAGE_CONNECTION_STRING"),
    ) {
        (Some(p), _) => Some(
            read_secret_file(p, "connection string")?
                .expose()
                .to_string(),
        ),
        (None, Some(s)) if !s.trim().is_empty() => Some(s),
        _ => None,
    }
    .map(|s| parse_connection_string(&s).map_err(ConfigError))
    .transpose()?;

    let (account, path) = match a.source.strip_prefix("az://") {
        Some(rest) => match rest.split_once('/') {
            Some((acct, path)) if !acct.is_empty() => (acct.to_string(), path.to_string()),
            _ => {
                return err(format!(
                    "source {:?}: expected az://ACCOUNT/CONTAINER[/PREFIX]",
                    a.source
                ))
            }
        },
        None if a.source.contains("://") => {
            return err(format!(
                "source {:?}: only az:// sources are supported",
                a.source
            ))
        }
        None => match conn.as_ref().and_then(|c| c.account.clone()) {
            Some(acct) => (acct, a.source.clone()),
            None => {
                return err(format!(
                "source {:?} names no account: use az://ACCOUNT/CONTAINER or a connection string",
                a.source
            ))
            }
        },
    };
    if let Some(c) = &conn {
        if c.account.as_deref().is_some_and(|ca| ca != account) {
            return err(format!(
                "the connection string is for another account than {account:?}"
            ));
        }
    }
    let path = path.trim_matches('/');
    let (container, prefix) = match path.split_once('/') {
        Some((c, p)) => (c.to_string(), p.trim_matches('/').to_string()),
        None => (path.to_string(), String::new()),
    };
    if !valid_container_name(&container) {
        return err(format!(
            "{container:?} is not a valid container name (3-63 lowercase letters, digits, hyphens)"
        ));
    }
    if simfs::index::names::split_blob_name(&prefix).is_err() && !prefix.is_empty() {
        return err(format!(
            "prefix {prefix:?} has an empty, '.' or '..' segment"
        ));
    }
    let prefix = if prefix.is_empty() {
        prefix
    } else {
        format!("{prefix}/")
    };

    let endpoint = match (
        &a.endpoint,
        conn.as_ref().and_then(|c| c.blob_endpoint.clone()),
    ) {
        (Some(e), _) => e.trim_end_matches('/').to_string(),
        (None, Some(e)) => e,
        (None, None) => format!("https://{account}.blob.core.windows.net"),
    };
    let mut container_url =
        Url::parse(&endpoint).map_err(|e| ConfigError(format!("endpoint {endpoint:?}: {e}")))?;
    if container_url.query().is_some() {
        return err("the endpoint must not carry a query string: give a SAS with --sas-token-file");
    }
    container_url
        .path_segments_mut()
        .map_err(|_| ConfigError(format!("endpoint {endpoint:?} cannot be a base URL")))?
        .pop_if_empty()
        .push(&container);

    let credential = resolve_credential(a, env, &account, conn.as_ref())?;
    Ok(Source {
        container_url,
        prefix,
        credential,
    })
}

fn resolve_credential(
    a: &SourceArgs,
    env: &dyn Fn(&str) -> Option<String>,
    account: &str,
    conn: Option<&simfs::blob::auth::ConnectionString>,
) -> Result<Credential, ConfigError> {
    let envs = |k: &str| env(k).filter(|v| !v.trim().is_empty()).map(Secret::new);
    // A secret variable that is set but empty is a mistake to name, not a reason to fall
    // through to another way of signing in (which then fails with an unrelated message).
    for k in SECRET_VARS {
        if env(k).is_some_and(|v| v.trim().is_empty()) {
            return err(format!("${k} is set but empty"));
        }
    }
    let sas = || -> Result<Option<Secret>, ConfigError> {
        Ok(match &a.sas_token_file {
            Some(p) => Some(read_secret_file(p, "SAS token")?),
            None => conn
                .and_then(|c| c.sas.clone())
                .or_else(|| envs("AZURE_STORAGE_SAS_TOKEN")),
        })
    };
    let key = || -> Result<Option<Secret>, ConfigError> {
        Ok(match &a.account_key_file {
            Some(p) => Some(read_secret_file(p, "account key")?),
            None => conn
                .and_then(|c| c.account_key.clone())
                .or_else(|| envs("AZURE_STORAGE_KEY"))
                .or_else(|| envs("AZURE_STORAGE_ACCOUNT_KEY")),
        })
    };
    let client_id = a.client_id.clone().or_else(|| env("AZURE_CLIENT_ID"));
    let key_cred = |k: Secret| -> Result<Credential, ConfigError> {
        use base64::Engine;
        if base64::engine::general_purpose::STANDARD
            .decode(k.expose())
            .is_err()
        {
            return err("the account key is not base64 (copy it whole from the portal or `az storage account keys list`)");
        }
        Ok(Credential::AccountKey {
            account: account.to_string(),
            key: k,
        })
    };
    Ok(match a.auth {
        AuthMode::Sas => Credential::Sas(sas()?.ok_or_else(|| {
            ConfigError("--auth sas: no SAS token (--sas-token-file, $AZURE_STORAGE_SAS_TOKEN or a connection string)".into())
        })?),
        AuthMode::AccountKey => key_cred(key()?.ok_or_else(|| {
            ConfigError("--auth account-key: no key (--account-key-file, $AZURE_STORAGE_KEY or a connection string)".into())
        })?)?,
        AuthMode::ManagedIdentity => Credential::ManagedIdentity { client_id },
        AuthMode::WorkloadIdentity => Credential::WorkloadIdentity,
        AuthMode::AzureCli => Credential::AzureCli,
        AuthMode::Anonymous => Credential::Anonymous,
        AuthMode::ServicePrincipal => {
            let tenant_id = env("AZURE_TENANT_ID").ok_or_else(|| {
                ConfigError("--auth service-principal needs a tenant_id ($AZURE_TENANT_ID)".into())
            })?;
            let client_id = client_id.ok_or_else(|| {
                ConfigError("--auth service-principal needs a client_id (--client-id, $AZURE_CLIENT_ID)".into())
            })?;
            match (envs("AZURE_CLIENT_SECRET"), env("AZURE_CLIENT_CERTIFICATE_PATH")) {
                (Some(secret), _) => Credential::ClientSecret {
                    tenant_id,
                    client_id,
                    secret,
                },
                (None, Some(path)) => Credential::ClientCertificate {
                    tenant_id,
                    client_id,
                    certificate: SecretBytes(std::fs::read(&path).map_err(|e| {
                        ConfigError(format!("client certificate {path}: {e}"))
                    })?),
                    password: envs("AZURE_CLIENT_CERTIFICATE_PASSWORD"),
                },
                (None, None) => {
                    return err("--auth service-principal needs a client_secret or a client_certificate_path ($AZURE_CLIENT_SECRET, $AZURE_CLIENT_CERTIFICATE_PATH)")
                }
            }
        }
        AuthMode::Auto => {
            if let Some(s) = sas()? {
                Credential::Sas(s)
            } else if let Some(k) = key()? {
                key_cred(k)?
            } else if env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                Credential::WorkloadIdentity
            } else {
                Credential::ManagedIdentity { client_id }
            }
        }
    })
}

impl SourceArgs {
    /// The library's mount configuration for these arguments.
    pub fn mount_config(&self) -> MountConfig {
        let mut cfg = MountConfig::new(&self.cache_dir);
        let d = &mut cfg.defaults;
        d.uid = self.uid.unwrap_or(d.uid);
        d.gid = self.gid.unwrap_or(d.gid);
        d.file_mode = self.file_mode;
        d.dir_mode = self.dir_mode;
        cfg.reindex = self.reindex;
        cfg.index_from_container = self.index_from_container;
        cfg.list_concurrency = self.list_concurrency;
        cfg.read_only = self.read_only;
        cfg.writeback.delay = std::time::Duration::from_secs_f64(self.upload_delay);
        cfg.writeback.quiet = (self.stage_when_quiet > 0.0)
            .then(|| std::time::Duration::from_secs_f64(self.stage_when_quiet));
        cfg.request_timeout = std::time::Duration::from_secs_f64(self.request_timeout);
        let bytes = |size: CacheSize| match size {
            CacheSize::Bytes(b) => Some(b),
            CacheSize::Percent(p) => simfs::cache::disk_size(&self.cache_dir)
                .ok()
                .map(|d| (d as f64 * p / 100.0) as u64),
        };
        cfg.cache.capacity = bytes(self.cache_size);
        cfg.writeback.sync = self.sync;
        cfg.writeback.max_pending_bytes =
            bytes(self.max_pending).unwrap_or(simfs::writeback::DEFAULT_MAX_PENDING_BYTES);
        cfg.writeback.max_pending_files = self.max_pending_files;
        cfg.cache.min_free = bytes(self.cache_min_free).unwrap_or(0);
        cfg.cache.verify = self.verify;
        cfg.limits = simfs::blob::limits::RateLimits {
            download_bytes_per_s: self.max_download_rate,
            upload_bytes_per_s: self.max_upload_rate,
            requests_per_s: self.max_requests_per_second,
        };
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        a: SourceArgs,
    }

    fn args(argv: &[&str]) -> SourceArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(argv);
        T::parse_from(v).a
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn credential_file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        use std::os::unix::fs::PermissionsExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), PermissionsExt::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn durations_parse_as_seconds_or_with_units_and_a_bad_one_says_what_is_accepted() {
        for (given, secs) in [
            ("30", 30.0),
            ("1.5", 1.5),
            ("5s", 5.0),
            ("2m", 120.0),
            ("1h", 3600.0),
            ("1h 30m", 5400.0),
        ] {
            assert_eq!(
                parse_seconds(given, 1.0, 86_400.0, None),
                Ok(secs),
                "{given}"
            );
        }
        assert_eq!(parse_delay("500ms"), Ok(0.5));
        let e = parse_timeout("5x").unwrap_err();
        assert!(e.contains("`5s`") && e.contains("seconds"), "{e}");
        assert!(parse_timeout("0").is_err(), "a timeout of 0 is refused");
        assert!(parse_timeout("2h").is_err(), "above its bound");
        assert_eq!(parse_seconds("0", 1.0, 60.0, Some("off")), Ok(0.0));
        assert!(parse_seconds("0.5", 1.0, 60.0, Some("off"))
            .unwrap_err()
            .contains("0 (off)"));
        assert!(parse_seconds("-1", 0.0, 60.0, None).is_err());
    }

    #[test]
    fn rates_take_a_size_per_second_and_no_share() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert!(parse_rate("10%").unwrap_err().contains("bytes per second"));
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_request_rate("20"), Ok(20.0));
        assert!(parse_request_rate("0").is_err());
    }

    #[test]
    fn read_ahead_takes_a_size_up_to_64m_or_0_for_the_kernels() {
        assert_eq!(parse_read_ahead("1M"), Ok(1 << 20));
        assert_eq!(parse_read_ahead("0"), Ok(0));
        assert!(parse_read_ahead("128M").unwrap_err().contains("up to 64M"));
        assert!(parse_read_ahead("5%").is_err());
    }

    #[test]
    fn cache_sizes_parse_as_bytes_units_or_a_share_of_the_disk() {
        assert_eq!(parse_size("500M"), Ok(CacheSize::Bytes(500 << 20)));
        assert_eq!(parse_size("64G"), Ok(CacheSize::Bytes(64 << 30)));
        assert_eq!(parse_size("1.5T"), Ok(CacheSize::Bytes(3 << 39)));
        assert_eq!(parse_size("4096"), Ok(CacheSize::Bytes(4096)));
        assert_eq!(parse_size("80%"), Ok(CacheSize::Percent(80.0)));
        for bad in ["", "0", "-1G", "12Q", "150%", "0%", "G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let cfg = args(&[
            "az://a/c",
            "--cache-dir",
            "/tmp/simfs-no-such/x",
            "--cache-size",
            "50%",
        ])
        .mount_config();
        let disk = simfs::cache::disk_size(std::path::Path::new("/tmp")).unwrap();
        assert_eq!(cfg.cache.capacity, Some(disk / 2));
        assert_eq!(
            cfg.cache.min_free,
            disk / 20,
            "the default floor is 5% of the disk"
        );
        let cfg = args(&[
            "az://a/c",
            "--cache-dir",
            "/tmp/x",
            "--cache-min-free",
            "2G",
        ])
        .mount_config();
        assert_eq!(cfg.cache.min_free, 2 << 30);
    }

    #[test]
    fn a_credential_file_replaces_the_environment() {
        let f = credential_file("sas_token = \"sv=2022-11-02&sp=racwdl&sig=abc\"\n", 0o600);
        let path = f.path().to_str().unwrap();
        let env = |k: &str| (k == "AZURE_STORAGE_KEY").then(|| "a2V5".to_string());
        let t = resolve(
            &args(&[
                "az://acct/cont",
                "--cache-dir",
                "/c",
                "--credential-file",
                path,
            ]),
            &env,
        )
        .unwrap();
        assert!(
            matches!(t.credential, Credential::Sas(_)),
            "{:?}",
            t.credential
        );
    }

    /// A self-signed certificate and key as PKCS#12, protected by `password`.
    fn pkcs12(password: &str) -> Vec<u8> {
        use openssl::{asn1::Asn1Time, hash::MessageDigest, pkey::PKey, rsa::Rsa, x509};
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "simfs-test").unwrap();
        let name = name.build();
        let mut cert = x509::X509Builder::new().unwrap();
        cert.set_subject_name(&name).unwrap();
        cert.set_issuer_name(&name).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        cert.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = cert.build();
        openssl::pkcs12::Pkcs12::builder()
            .name("simfs")
            .pkey(&key)
            .cert(&cert)
            .build2(password)
            .unwrap()
            .to_der()
            .unwrap()
    }

    #[test]
    fn a_service_principal_certificate_from_the_credential_file_builds() {
        let p12 = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(p12.path(), pkcs12("pw")).unwrap();
        let text = format!(
            "tenant_id = \"11111111-2222-3333-4444-555555555555\"\nclient_id = \"app\"\n\
             client_certificate_path = {:?}\nclient_certificate_password = \"pw\"\n",
            p12.path()
        );
        let f = credential_file(&text, 0o600);
        let path = f.path().to_str().unwrap();
        let argv = [
            "az://acct/cont",
            "--cache-dir",
            "/c",
            "--auth",
            "service-principal",
            "--credential-file",
            path,
        ];
        let t = resolve(&args(&argv), &no_env).unwrap();
        assert_eq!(t.credential.describe(), "service principal (certificate)");
        assert!(t.credential.token_credential().unwrap().is_some());
        // A wrong password fails when the credential is built, before any request.
        let text = text.replace("\"pw\"", "\"wrong\"");
        let f = credential_file(&text, 0o600);
        let argv = [
            &argv[..5],
            &["--credential-file", f.path().to_str().unwrap()],
        ]
        .concat();
        let t = resolve(&args(&argv), &no_env).unwrap();
        assert!(t.credential.token_credential().is_err());
        assert!(
            !format!("{:?}", t.credential).contains("pw"),
            "secrets stay redacted"
        );
    }

    #[test]
    fn a_credential_file_others_can_read_or_with_unknown_keys_is_refused() {
        let resolve_file = |text: &str, mode: u32| {
            let f = credential_file(text, mode);
            let path = f.path().to_str().unwrap().to_string();
            resolve(
                &args(&[
                    "az://acct/cont",
                    "--cache-dir",
                    "/c",
                    "--credential-file",
                    &path,
                ]),
                &no_env,
            )
            .unwrap_err()
            .to_string()
        };
        let e = resolve_file("account_key = \"a2V5\"\n", 0o644);
        assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
        let e = resolve_file("acount_key = \"a2V5\"\n", 0o600);
        assert!(e.contains("unknown key \"acount_key\""), "{e}");
        let e = resolve_file("account_key = 5\n", 0o600);
        assert!(e.contains("must be a string"), "{e}");
        let e = resolve_file("account_key = \"\n", 0o600);
        assert!(e.contains("not valid TOML"), "{e}");
        // The message never shows the secret.
        let e = resolve_file("sas_token = \"sp=rl&sig=SECRET\"\nx = 1\n", 0o600);
        assert!(!e.contains("SECRET"), "{e}");
    }

    #[test]
    fn az_source_with_prefix_and_public_endpoint() {
        let t = resolve(
            &args(&["az://acct/data/train/v1/", "--cache-dir", "/c"]),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            t.container_url.as_str(),
            "https://acct.blob.core.windows.net/data"
        );
        assert_eq!(t.prefix, "train/v1/");
        assert_eq!(
            t.credential,
            Credential::ManagedIdentity { client_id: None }
        );
    }

    #[test]
    fn endpoint_overrides_for_azurite() {
        let t = resolve(
            &args(&[
                "az://devstoreaccount1/data",
                "--endpoint",
                "http://127.0.0.1:10000/devstoreaccount1/",
                "--cache-dir",
                "/c",
            ]),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            t.container_url.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/data"
        );
        assert_eq!(t.prefix, "");
    }

    #[test]
    fn connection_string_supplies_account_endpoint_and_key() {
        let env = |k: &str| {
            (k == "AZURE_STORAGE_CONNECTION_STRING")
                .then(|| "UseDevelopmentStorage=true".to_string())
        };
        let t = resolve(&args(&["data/sub", "--cache-dir", "/c"]), &env).unwrap();
        assert_eq!(
            t.container_url.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/data"
        );
        assert!(matches!(t.credential, Credential::AccountKey { .. }));
    }

    #[test]
    fn sas_from_environment_wins_in_auto_mode() {
        let env = |k: &str| match k {
            "AZURE_STORAGE_SAS_TOKEN" => Some("?sv=x&sig=y".to_string()),
            "AZURE_STORAGE_KEY" => Some("a2V5".to_string()),
            _ => None,
        };
        let t = resolve(&args(&["az://a/cont", "--cache-dir", "/c"]), &env).unwrap();
        assert_eq!(t.credential, Credential::Sas(Secret::new("?sv=x&sig=y")));
        let t = resolve(
            &args(&["az://a/cont", "--cache-dir", "/c", "--auth", "account-key"]),
            &env,
        )
        .unwrap();
        assert!(matches!(t.credential, Credential::AccountKey { .. }));
    }

    #[test]
    fn bad_sources_get_clear_errors() {
        let e = |argv: &[&str]| resolve(&args(argv), &no_env).unwrap_err().0;
        assert!(
            e(&["az://acct/Bad_Name", "--cache-dir", "/c"]).contains("not a valid container name")
        );
        assert!(e(&["data", "--cache-dir", "/c"]).contains("names no account"));
        assert!(e(&["s3://b/k", "--cache-dir", "/c"]).contains("only az://"));
        assert!(e(&["az://acct/data/a/../b", "--cache-dir", "/c"]).contains("prefix"));
        assert!(
            e(&["az://acct/data", "--cache-dir", "/c", "--auth", "sas"]).contains("no SAS token")
        );
        assert!(e(&[
            "az://acct/data",
            "--cache-dir",
            "/c",
            "--sas-token-file",
            "/nonexistent"
        ])
        .contains("cannot read SAS token file"));
    }

    #[test]
    fn container_name_rules() {
        assert!(valid_container_name("data-01"));
        assert!(valid_container_name("$root"));
        assert!(!valid_container_name("ab"));
        assert!(!valid_container_name("-ab"));
        assert!(!valid_container_name("a--b"));
        assert!(!valid_container_name("UPPER"));
    }
}

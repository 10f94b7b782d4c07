//! simfs-seed: writes a container in the format simfs reads (Blobfuse2 / AMLFS / rclone
//! metadata), for the demo, the fuse-tests and the benchmarks.
//!
//! It uploads a local directory faithfully (directories as `hdi_isfolder` markers, symlinks
//! as `is_symlink` blobs holding their target, modes, owners and mtimes as metadata) and can
//! add a synthetic dataset of many small files and one large file. It authenticates with an
//! account key (default: Azurite's well-known development account) through a short account
//! SAS, because creating a container needs more than a container SAS grants.

use azure_core::http::{ClientOptions, RequestContent};
use azure_storage_blob::models::BlobClientUploadOptions;
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use clap::Parser;
use futures::StreamExt;
use simfs::blob::auth::{SasPolicy, Secret, DEV_ACCOUNT, DEV_KEY};
use simfs::blob::format;
use simfs::blob::sas::{sign_account_sas, sign_container_sas};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Parser)]
#[command(about = "Seed a container in the format simfs reads")]
struct Args {
    /// Blob service endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    container: String,
    #[arg(long, default_value = DEV_ACCOUNT)]
    account: String,
    /// Account key (base64); default Azurite's development key. Read from this variable.
    #[arg(long, default_value = "SIMFS_SEED_ACCOUNT_KEY")]
    key_env: String,
    /// Upload this local directory (repeatable: DIR=PREFIX, PREFIX may be empty).
    #[arg(long = "dir")]
    dirs: Vec<String>,
    /// Add this many small synthetic files under data/.
    #[arg(long, default_value_t = 0)]
    files: usize,
    /// Add a large file of this many MiB at big/large.bin.
    #[arg(long, default_value_t = 0)]
    big_mib: usize,
    /// Add a blob with exactly this name and a small body (odd names for tests).
    #[arg(long = "raw")]
    raw: Vec<String>,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Afterwards print a container SAS URL with these permissions (e.g. `racwdl`), valid
    /// for six hours: other tools (rclone's `sas_url`) reach an emulator on any port with it.
    #[arg(long, value_name = "PERMISSIONS")]
    print_sas: Option<String>,
}

struct Upload {
    name: String,
    body: Vec<u8>,
    meta: HashMap<String, String>,
}

fn posix_meta(md: &std::fs::Metadata) -> HashMap<String, String> {
    let mtime =
        SystemTime::UNIX_EPOCH + Duration::new(md.mtime().max(0) as u64, md.mtime_nsec() as u32);
    HashMap::from([
        (
            "permissions".to_string(),
            format!("{:04o}", md.mode() & 0o7777),
        ),
        ("owner".to_string(), md.uid().to_string()),
        ("group".to_string(), md.gid().to_string()),
        ("mtime".to_string(), format::format_time(mtime)),
    ])
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<Upload>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = format!("{prefix}{rel}");
        let md = std::fs::symlink_metadata(&path)?;
        let mut meta = posix_meta(&md);
        if md.file_type().is_symlink() {
            meta.insert("is_symlink".into(), "true".into());
            let target = std::fs::read_link(&path)?;
            out.push(Upload {
                name,
                body: target.to_string_lossy().into_owned().into_bytes(),
                meta,
            });
        } else if md.is_dir() {
            meta.insert("hdi_isfolder".into(), "true".into());
            out.push(Upload {
                name,
                body: Vec::new(),
                meta,
            });
            walk(root, &path, prefix, out)?;
        } else if md.is_file() {
            out.push(Upload {
                name,
                body: std::fs::read(&path)?,
                meta,
            });
        }
    }
    Ok(())
}

fn synthetic(files: usize, big_mib: usize, out: &mut Vec<Upload>) {
    for i in 0..files {
        let len = 64 + (i * 7919) % 2048;
        let body: Vec<u8> = (0..len).map(|j| ((i + j) % 251) as u8).collect();
        out.push(Upload {
            name: format!("data/shard-{:03}/sample-{i:06}.bin", i / 500),
            body,
            meta: HashMap::new(),
        });
    }
    if big_mib > 0 {
        let body: Vec<u8> = (0..big_mib << 20).map(|j| (j % 253) as u8).collect();
        out.push(Upload {
            name: "big/large.bin".into(),
            body,
            meta: HashMap::new(),
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let key_b64 = std::env::var(&a.key_env).unwrap_or_else(|_| DEV_KEY.to_string());
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.decode(key_b64.trim())?;
    let now = SystemTime::now();
    let sas = sign_account_sas(
        &a.account,
        &key,
        "racwdl",
        now - Duration::from_secs(300),
        now + Duration::from_secs(6 * 3600),
    );
    let mut client_options = ClientOptions::default();
    client_options
        .per_call_policies
        .push(Arc::new(SasPolicy::fixed(Secret::new(sas))));
    let url = azure_core::http::Url::parse(&format!(
        "{}/{}",
        a.endpoint.trim_end_matches('/'),
        a.container
    ))?;
    let client = Arc::new(BlobContainerClient::new(
        url.clone(),
        None,
        Some(BlobContainerClientOptions {
            client_options,
            ..Default::default()
        }),
    )?);
    if let Err(e) = client.create(None).await {
        if e.http_status().map(u16::from) != Some(409) {
            return Err(format!("creating container {}: {e}", a.container).into());
        }
    }
    let mut uploads = Vec::new();
    for spec in &a.dirs {
        let (dir, prefix) = spec.split_once('=').unwrap_or((spec, ""));
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.trim_matches('/'))
        };
        let root = PathBuf::from(dir);
        walk(&root, &root, &prefix, &mut uploads)?;
    }
    synthetic(a.files, a.big_mib, &mut uploads);
    for name in &a.raw {
        uploads.push(Upload {
            name: name.clone(),
            body: b"raw".to_vec(),
            meta: HashMap::new(),
        });
    }
    let total = uploads.len();
    let started = std::time::Instant::now();
    let mut results = futures::stream::iter(uploads.into_iter().map(|u| {
        let client = client.clone();
        async move {
            let opts = BlobClientUploadOptions {
                metadata: Some(u.meta),
                ..Default::default()
            };
            client
                .blob_client(&u.name)
                .upload(RequestContent::from(u.body), Some(opts))
                .await
                .map_err(|e| format!("{}: {e}", u.name))
        }
    }))
    .buffer_unordered(a.concurrency.max(1));
    while let Some(r) = results.next().await {
        r?;
    }
    eprintln!(
        "seeded {total} blobs into {} in {:.1?}",
        a.container,
        started.elapsed()
    );
    if let Some(perms) = &a.print_sas {
        let sas = sign_container_sas(
            &a.account,
            &key,
            &a.container,
            perms,
            now - Duration::from_secs(300),
            now + Duration::from_secs(6 * 3600),
        );
        println!("{url}?{sas}");
    }
    Ok(())
}

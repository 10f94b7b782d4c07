//! Credentials: which one a mount uses, and turning it into something the SDK accepts.
//!
//! SAS tokens (static) and account keys (simfs signs its own short-lived SAS, see `sas.rs`)
//! are applied by `SasPolicy`, a pipeline policy that appends the current token to every
//! request URL. Entra ID credentials come from `azure_identity` and go to the SDK as a
//! `TokenCredential`. Secrets are held in `Secret`, whose Debug and Display print nothing,
//! so a secret cannot reach a log line by accident.

use super::sas::{sas_expiry, sign_container_sas};
use azure_core::credentials::TokenCredential;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into().trim().to_string())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Public containers, and nothing else configured.
    Anonymous,
    Sas(Secret),
    AccountKey {
        account: String,
        key: Secret,
    },
    ManagedIdentity {
        client_id: Option<String>,
    },
    WorkloadIdentity,
    AzureCli,
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Secret,
    },
    /// A service principal authenticating with a PKCS#12 certificate (with its key).
    ClientCertificate {
        tenant_id: String,
        client_id: String,
        /// The PKCS#12 file's bytes.
        certificate: SecretBytes,
        password: Option<Secret>,
    },
}

/// Secret bytes (a certificate with its private key), never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

impl Credential {
    /// For a SAS: whether its permissions (`sp`) leave out writing, so a read-write mount
    /// could never upload. Other credentials: false (their rights show at the first write).
    pub fn sas_cannot_write(&self) -> bool {
        let Credential::Sas(sas) = self else {
            return false;
        };
        let query = sas.expose().trim_start_matches('?');
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "sp")
            .is_some_and(|(_, perms)| !perms.contains('w'))
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Credential::Anonymous => "anonymous",
            Credential::Sas(_) => "SAS token",
            Credential::AccountKey { .. } => "account key (signed SAS)",
            Credential::ManagedIdentity { .. } => "managed identity",
            Credential::WorkloadIdentity => "workload identity",
            Credential::AzureCli => "Azure CLI",
            Credential::ClientSecret { .. } => "service principal (client secret)",
            Credential::ClientCertificate { .. } => "service principal (certificate)",
        }
    }

    /// The Entra ID credential for the SDK, when this is one.
    pub fn token_credential(&self) -> azure_core::Result<Option<Arc<dyn TokenCredential>>> {
        use azure_identity::*;
        Ok(Some(match self {
            Credential::ManagedIdentity { client_id } => {
                let opts = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    ..Default::default()
                };
                ManagedIdentityCredential::new(Some(opts))? as Arc<dyn TokenCredential>
            }
            Credential::WorkloadIdentity => WorkloadIdentityCredential::new(None)?,
            Credential::AzureCli => AzureCliCredential::new(None)?,
            Credential::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                secret.expose().to_string().into(),
                None,
            )?,
            Credential::ClientCertificate {
                tenant_id,
                client_id,
                certificate,
                password,
            } => ClientCertificateCredential::new(
                tenant_id.clone(),
                client_id.clone(),
                azure_core::credentials::SecretBytes::new(certificate.0.clone()),
                Some(ClientCertificateCredentialOptions {
                    password: password.as_ref().map(|p| p.expose().to_string().into()),
                    ..Default::default()
                }),
            )?,
            _ => return Ok(None),
        }))
    }

    /// The SAS policy for the SDK pipeline, when this credential is applied as a SAS.
    pub fn sas_policy(&self, container: &str, permissions: &str) -> Option<Arc<SasPolicy>> {
        match self {
            Credential::Sas(s) => Some(Arc::new(SasPolicy::fixed(s.clone()))),
            Credential::AccountKey { account, key } => Some(Arc::new(SasPolicy::signed(
                account,
                key,
                container,
                permissions,
            ))),
            _ => None,
        }
    }
}

/// How long a self-signed SAS lives, and how long before expiry it is renewed.
const SAS_LIFETIME: Duration = Duration::from_secs(4 * 3600);
const SAS_RENEW_BEFORE: Duration = Duration::from_secs(3600);

struct Signer {
    account: String,
    key: Vec<u8>,
    container: String,
    permissions: String,
}

/// Appends the current SAS to each request's query string.
pub struct SasPolicy {
    signer: Option<Signer>,
    current: RwLock<(Secret, Option<SystemTime>)>,
}

impl fmt::Debug for SasPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SasPolicy")
    }
}

impl SasPolicy {
    pub fn fixed(sas: Secret) -> SasPolicy {
        let token = Secret::new(sas.expose().trim_start_matches('?'));
        let expiry = sas_expiry(token.expose());
        SasPolicy {
            signer: None,
            current: RwLock::new((token, expiry)),
        }
    }

    pub fn signed(account: &str, key: &Secret, container: &str, permissions: &str) -> SasPolicy {
        use base64::Engine;
        // config rejects keys that are not base64; should one arrive anyway, signing with its
        // raw bytes fails at the service as an authentication error rather than here.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.expose())
            .unwrap_or_else(|_| key.expose().as_bytes().to_vec());
        let policy = SasPolicy {
            signer: Some(Signer {
                account: account.to_string(),
                key: raw,
                container: container.to_string(),
                permissions: permissions.to_string(),
            }),
            current: RwLock::new((Secret::new(""), Some(SystemTime::UNIX_EPOCH))),
        };
        policy.token_at(SystemTime::now());
        policy
    }

    /// The token to use at `now`, re-signing it when it is close to expiry.
    pub fn token_at(&self, now: SystemTime) -> Secret {
        {
            let cur = self.current.read().unwrap();
            let fresh = match (&self.signer, cur.1) {
                (Some(_), Some(exp)) => now + SAS_RENEW_BEFORE < exp,
                _ => true,
            };
            if fresh {
                return cur.0.clone();
            }
        }
        let s = self
            .signer
            .as_ref()
            .expect("only signed tokens expire here");
        // Start a little in the past: the service may be a few seconds behind this clock.
        let start = now - Duration::from_secs(300);
        let expiry = now + SAS_LIFETIME;
        let token = Secret::new(sign_container_sas(
            &s.account,
            &s.key,
            &s.container,
            &s.permissions,
            start,
            expiry,
        ));
        *self.current.write().unwrap() = (token.clone(), Some(expiry));
        tracing::debug!("signed a new container SAS valid until {:?}", expiry);
        token
    }

    /// When the token in use expires, if known.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.current.read().unwrap().1
    }
}

#[async_trait::async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let token = self.token_at(SystemTime::now());
        let url = request.url_mut();
        let query = match url.query() {
            Some(q) if !q.is_empty() => format!("{q}&{}", token.expose()),
            _ => token.expose().to_string(),
        };
        url.set_query(Some(&query));
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// Fields of an Azure Storage connection string that simfs uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionString {
    pub account: Option<String>,
    pub account_key: Option<Secret>,
    pub sas: Option<Secret>,
    pub blob_endpoint: Option<String>,
}

pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Parses `Key=Value;...` (keys case-insensitive), including `UseDevelopmentStorage=true`.
pub fn parse_connection_string(s: &str) -> Result<ConnectionString, String> {
    let mut out = ConnectionString::default();
    let mut protocol = "https".to_string();
    let mut suffix = "core.windows.net".to_string();
    let mut dev = false;
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| "connection string: every part must be Key=Value".to_string())?;
        match k.trim().to_ascii_lowercase().as_str() {
            "usedevelopmentstorage" => dev = v.trim().eq_ignore_ascii_case("true"),
            "accountname" => out.account = Some(v.trim().to_string()),
            "accountkey" => out.account_key = Some(Secret::new(v)),
            "sharedaccesssignature" => out.sas = Some(Secret::new(v)),
            "blobendpoint" => out.blob_endpoint = Some(v.trim().trim_end_matches('/').to_string()),
            "defaultendpointsprotocol" => protocol = v.trim().to_string(),
            "endpointsuffix" => suffix = v.trim().to_string(),
            // Other services' endpoints and proxy settings do not concern a blob mount.
            _ => {}
        }
    }
    if dev {
        out.account.get_or_insert_with(|| DEV_ACCOUNT.to_string());
        if out.sas.is_none() {
            out.account_key.get_or_insert_with(|| Secret::new(DEV_KEY));
        }
        out.blob_endpoint
            .get_or_insert_with(|| format!("http://127.0.0.1:10000/{DEV_ACCOUNT}"));
    }
    if out.blob_endpoint.is_none() {
        if let Some(a) = &out.account {
            out.blob_endpoint = Some(format!("{protocol}://{a}.blob.{suffix}"));
        }
    }
    if out.blob_endpoint.is_none() {
        return Err("connection string names neither AccountName nor BlobEndpoint".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_sas_is_recognised() {
        let ro = Credential::Sas(Secret::new("sv=2022-11-02&sp=rl&sig=x"));
        let rw = Credential::Sas(Secret::new("?sv=2022-11-02&sp=racwdl&sig=x"));
        assert!(ro.sas_cannot_write());
        assert!(!rw.sas_cannot_write());
        assert!(!Credential::Anonymous.sas_cannot_write());
    }

    #[test]
    fn secrets_never_print() {
        let c = Credential::Sas(Secret::new("sv=1&sig=SECRET"));
        assert!(!format!("{c:?}").contains("SECRET"));
        let k = Credential::AccountKey {
            account: "a".into(),
            key: Secret::new("KEYDATA"),
        };
        assert!(!format!("{k:?}").contains("KEYDATA"));
    }

    #[test]
    fn parses_development_storage_shortcut() {
        let c = parse_connection_string("UseDevelopmentStorage=true").unwrap();
        assert_eq!(c.account.as_deref(), Some(DEV_ACCOUNT));
        assert_eq!(c.account_key, Some(Secret::new(DEV_KEY)));
        assert_eq!(
            c.blob_endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
    }

    #[test]
    fn parses_account_key_and_sas_connection_strings() {
        let c = parse_connection_string(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn",
        )
        .unwrap();
        assert_eq!(
            c.blob_endpoint.as_deref(),
            Some("https://acct.blob.core.chinacloudapi.cn")
        );
        assert_eq!(c.account_key.unwrap().expose(), "a2V5");
        let c = parse_connection_string(
            "BlobEndpoint=https://x.example/;SharedAccessSignature=sv=2022&sig=abc",
        )
        .unwrap();
        assert_eq!(c.blob_endpoint.as_deref(), Some("https://x.example"));
        assert_eq!(c.sas.unwrap().expose(), "sv=2022&sig=abc");
        assert!(parse_connection_string("garbage").is_err());
        assert!(parse_connection_string("AccountKey=abc").is_err());
    }

    #[test]
    fn signed_sas_is_renewed_before_it_expires() {
        let p = SasPolicy::signed("acct", &Secret::new("a2V5"), "c", "rl");
        let now = SystemTime::now();
        let first = p.token_at(now);
        assert_eq!(
            p.token_at(now + Duration::from_secs(60)),
            first,
            "still fresh"
        );
        let later = now + SAS_LIFETIME - SAS_RENEW_BEFORE + Duration::from_secs(1);
        let renewed = p.token_at(later);
        assert_ne!(renewed, first);
        assert!(p.expiry().unwrap() > later + SAS_RENEW_BEFORE);
    }

    #[test]
    fn managed_identity_credential_builds_without_network() {
        let c = Credential::ManagedIdentity {
            client_id: Some("00000000-0000-0000-0000-000000000001".into()),
        };
        assert!(c.token_credential().unwrap().is_some());
        assert!(Credential::Sas(Secret::new("x"))
            .token_credential()
            .unwrap()
            .is_none());
    }
}

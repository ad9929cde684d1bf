//! The site key-encryption key (KEK) held in a PKCS#11 token.
//!
//! The KEK is a 256-bit generic secret generated inside the token (`dqkd pki kek --pkcs11`),
//! sensitive and not extractable, so no process ever sees its bytes. The key store asks the
//! token for HMAC-SHA256 values ([`dqkd_store::HeldKek`]): one per epoch of 2^28 seals and
//! one per older epoch met when opening, so the token is touched a handful of times per start
//! and keys are sealed and opened in memory at full speed.
//!
//! The module (a shared library such as SoftHSM2's) is loaded and initialised once per
//! process and never finalised, because PKCS#11 state is per process: a second context of the
//! same module would share, and on drop tear down, the first one's sessions.

mod error;
mod uri;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use dqkd_store::{HeldKek, Kek, StoreError};
use zeroize::{Zeroize, Zeroizing};

pub use error::Pkcs11Error;
pub use uri::KekUri;

/// Length of the KEK generated in the token, in bytes.
const KEK_BYTES: usize = 32;

/// HMAC input of the liveness probe (distinct from every input the store uses).
const PROBE: &[u8] = b"dqkd-kek-pkcs11/probe/v1";

/// A token PIN. Zeroized on drop; `Debug` hides it.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN read from the site file or the environment.
    pub fn new(pin: String) -> Self {
        Pin(Zeroizing::new(pin))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Where the KEK is and how to reach it: the token's module, the URI and the user PIN.
#[derive(Debug, Clone)]
pub struct TokenKekConfig {
    /// The PKCS#11 module (shared library) of the token.
    pub module: PathBuf,
    /// Token and object labels.
    pub uri: KekUri,
    /// The token's user PIN.
    pub pin: Pin,
}

/// A KEK in a token, open and checked: logged in, the key found, sensitive and not
/// extractable, and answering. Implements [`HeldKek`] for the key store.
pub struct TokenKek {
    uri: KekUri,
    module: Pkcs11,
    slot: Slot,
    session: Mutex<Session>,
    key: ObjectHandle,
}

impl fmt::Debug for TokenKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKek({})", self.uri)
    }
}

impl TokenKek {
    /// Opens the KEK named by `config`, refusing with a clear error when the module does not
    /// load, no token has that label, the PIN is wrong, the key is missing or ambiguous, or the
    /// key could leave the token.
    pub fn open(config: &TokenKekConfig) -> Result<Self, Pkcs11Error> {
        let module = load(&config.module)?;
        let slot = find_token(&module, config.uri.token())?;
        let session = login(&module, slot, config, false)?;
        let key = find_key(&session, &config.uri)?.ok_or_else(|| Pkcs11Error::ObjectMissing {
            uri: config.uri.to_string(),
        })?;
        let attrs = session
            .get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])
            .map_err(|e| device("reading the key's attributes", e))?;
        let exposed = attrs.iter().any(|a| {
            matches!(a, Attribute::Sensitive(false)) || matches!(a, Attribute::Extractable(true))
        });
        if exposed {
            return Err(Pkcs11Error::KeyExposed {
                uri: config.uri.to_string(),
            });
        }
        let kek = TokenKek {
            uri: config.uri.clone(),
            module,
            slot,
            session: Mutex::new(session),
            key,
        };
        kek.hmac(PROBE)?;
        Ok(kek)
    }

    /// Opens the KEK and wraps it for the key store.
    pub fn open_kek(config: &TokenKekConfig) -> Result<Kek, Pkcs11Error> {
        Ok(Kek::held(Arc::new(Self::open(config)?)))
    }

    /// HMAC-SHA256 of `input` under the KEK, inside the token.
    fn hmac(&self, input: &[u8]) -> Result<Zeroizing<[u8; 32]>, Pkcs11Error> {
        let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let mut mac = session
            .sign(&Mechanism::Sha256Hmac, self.key, input)
            .map_err(|e| lost("computing an HMAC with the key", e))?;
        let mut out = Zeroizing::new([0u8; 32]);
        let ok = mac.len() == out.len();
        if ok {
            out.copy_from_slice(&mac);
        }
        mac.zeroize();
        if ok {
            Ok(out)
        } else {
            Err(Pkcs11Error::Device {
                context: "computing an HMAC with the key".into(),
                reason: "the token returned an HMAC of the wrong length".into(),
            })
        }
    }
}

impl HeldKek for TokenKek {
    fn hmac_sha256(&self, input: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
        self.hmac(input).map_err(|e| self.store_error(e))
    }

    fn describe(&self) -> String {
        format!("PKCS#11 {}", self.uri)
    }

    fn check(&self) -> Result<(), StoreError> {
        let present = self
            .module
            .get_token_info(self.slot)
            .map_err(|e| lost("reading the token's state", e));
        present
            .and_then(|_| self.hmac(PROBE).map(drop))
            .map_err(|e| self.store_error(e))
    }
}

impl TokenKek {
    fn store_error(&self, e: Pkcs11Error) -> StoreError {
        StoreError::KekDevice {
            device: self.describe(),
            reason: e.to_string(),
        }
    }
}

/// Generates a new KEK in the token named by `config`: a 256-bit generic secret for
/// HMAC-SHA256, stored on the token, private, sensitive and never extractable. Refuses when
/// the token already holds a key of that label, because replacing a KEK makes every key
/// sealed under it unreadable.
pub fn generate(config: &TokenKekConfig) -> Result<(), Pkcs11Error> {
    let module = load(&config.module)?;
    let slot = find_token(&module, config.uri.token())?;
    let session = login(&module, slot, config, true)?;
    if find_key(&session, &config.uri)?.is_some() {
        return Err(Pkcs11Error::ObjectExists {
            uri: config.uri.to_string(),
        });
    }
    let label = config.uri.object().as_bytes().to_vec();
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(KEK_BYTES.try_into().map_err(|e| device("key length", e))?),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(label),
    ];
    session
        .generate_key(&Mechanism::GenericSecretKeyGen, &template)
        .map_err(|e| device("generating the key in the token", e))?;
    Ok(())
}

/// The module at `path`, loaded and initialised once per process.
fn load(path: &Path) -> Result<Pkcs11, Pkcs11Error> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(module) = modules.get(path) {
        return Ok(module.clone());
    }
    let module = Pkcs11::new(path).map_err(|e| Pkcs11Error::Module {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Pkcs11Error::Module {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
    }
    modules.insert(path.to_owned(), module.clone());
    Ok(module)
}

/// The slot whose token has `label`; the error lists the labels present.
fn find_token(module: &Pkcs11, label: &str) -> Result<Slot, Pkcs11Error> {
    let slots = module
        .get_slots_with_token()
        .map_err(|e| device("listing the slots", e))?;
    let mut present = Vec::new();
    for slot in slots {
        let Ok(info) = module.get_token_info(slot) else {
            continue;
        };
        if info.label().trim_end() == label {
            return Ok(slot);
        }
        present.push(info.label().trim_end().to_owned());
    }
    Err(Pkcs11Error::TokenMissing {
        token: label.to_owned(),
        present,
    })
}

fn login(
    module: &Pkcs11,
    slot: Slot,
    config: &TokenKekConfig,
    rw: bool,
) -> Result<Session, Pkcs11Error> {
    let session = if rw {
        module.open_rw_session(slot)
    } else {
        module.open_ro_session(slot)
    }
    .map_err(|e| device("opening a session", e))?;
    let pin = AuthPin::from(config.pin.0.as_str());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
            Err(Pkcs11Error::WrongPin {
                token: config.uri.token().to_owned(),
            })
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Pkcs11Error::PinLocked {
            token: config.uri.token().to_owned(),
        }),
        Err(e) => Err(device("logging in", e)),
    }
}

/// The secret key labelled as `uri` says: `None` if there is none; more than one is refused.
fn find_key(session: &Session, uri: &KekUri) -> Result<Option<ObjectHandle>, Pkcs11Error> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(uri.object().as_bytes().to_vec()),
        ])
        .map_err(|e| device("searching for the key", e))?;
    match found.as_slice() {
        [] => Ok(None),
        [key] => Ok(Some(*key)),
        many => Err(Pkcs11Error::Ambiguous {
            uri: uri.to_string(),
            count: many.len(),
        }),
    }
}

fn device(context: &str, e: impl fmt::Display) -> Pkcs11Error {
    Pkcs11Error::Device {
        context: context.into(),
        reason: e.to_string(),
    }
}

/// A failure while using the key: named as the token being gone when the module says so.
fn lost(context: &str, e: CkError) -> Pkcs11Error {
    match e {
        CkError::Pkcs11(
            rv @ (RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::DeviceError
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
            | RvError::SlotIdInvalid
            | RvError::UserNotLoggedIn),
            _,
        ) => Pkcs11Error::TokenLost {
            context: context.into(),
            reason: format!("{rv:?}"),
        },
        e => device(context, e),
    }
}

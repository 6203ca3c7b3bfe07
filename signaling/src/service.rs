//! Services: named sets of methods that a peer or the server provides and any peer calls.
//!
//! The same [`Service`] is given to `P2p::provide` (a peer provides it) or to
//! `P2pSignaling::provide` (the server does): callers cannot tell the difference.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use crate::protocol::{CallError, CallOutcome, PeerInfo};

/// The error a method returns: a code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable text.
    pub message: String,
}

impl ServiceError {
    /// A new error.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Json, ServiceError>> + Send>>;
type Method = Arc<dyn Fn(PeerInfo, Json) -> BoxFut + Send + Sync>;

/// A named set of methods; each takes JSON arguments (deserialized into the type the
/// closure asks for) and returns a serializable result or a [`ServiceError`].
///
/// ```
/// use socketio_p2p_signaling::{Service, ServiceError};
/// let calc = Service::new()
///     .method("add", |(a, b): (i64, i64)| async move { Ok::<_, ServiceError>(a + b) })
///     .method("div", |(a, b): (i64, i64)| async move {
///         if b == 0 {
///             return Err(ServiceError::new("DivByZero", "cannot divide by zero"));
///         }
///         Ok(a / b)
///     });
/// assert!(calc.has_method("add"));
/// ```
#[derive(Clone, Default)]
#[must_use = "a service does nothing until provided"]
pub struct Service {
    methods: HashMap<String, Method>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.methods.keys().collect();
        names.sort();
        f.debug_struct("Service").field("methods", &names).finish()
    }
}

impl Service {
    /// A service without methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a method. Arguments that do not deserialize into `A` get a `BadArgs` error.
    pub fn method<A, R, F, Fut>(self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        self.method_with_caller(name, move |_: PeerInfo, a: A| f(a))
    }

    /// Adds a method that also learns who calls it.
    pub fn method_with_caller<A, R, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(PeerInfo, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let m: Method = Arc::new(move |caller: PeerInfo, args: Json| {
            let f = f.clone();
            Box::pin(async move {
                let a: A = serde_json::from_value(args)
                    .map_err(|e| ServiceError::new("BadArgs", e.to_string()))?;
                let r = f(caller, a).await?;
                serde_json::to_value(r).map_err(|e| ServiceError::new("BadResult", e.to_string()))
            }) as BoxFut
        });
        self.methods.insert(name.to_owned(), m);
        self
    }

    /// True if the service has this method.
    pub fn has_method(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    /// Runs a method (what the provider does with a call).
    pub async fn call(&self, caller: PeerInfo, method: &str, args: Json) -> CallOutcome {
        let Some(m) = self.methods.get(method).cloned() else {
            return CallOutcome::Error(CallError {
                code: "UnknownMethod".into(),
                message: format!("no method {method:?}"),
            });
        };
        match m(caller, args).await {
            Ok(v) => CallOutcome::Ok(v),
            Err(e) => CallOutcome::Error(CallError {
                code: e.code,
                message: e.message,
            }),
        }
    }
}

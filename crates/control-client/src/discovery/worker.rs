//! The subscriber task: connect, `Hello`, apply/ACK/NACK, persist, reconnect.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use ambit_api::config::v1::config_discovery_client::ConfigDiscoveryClient;
use ambit_api::config::v1::{
    Ack, ConfigUpdate, Hello, Nack, ResourceError, SubscribeRequest, subscribe_request,
};
use ambit_api::time::{timestamp_from_proto, timestamp_to_proto};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming};

use super::persist::{self, LoadStateError, PersistedState};
use super::state::{self, ConfigState, ProposedState, Rejection, StateSource};
use super::{
    NackStatus, Shared, StateFileLoad, Subscriber, SubscriptionConfig, SubscriptionCounters,
    Validator,
};
use crate::error_chain;
use crate::token::TokenError;

/// Why a config stream could not be opened or ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// No usable credential.
    #[error("getting the bearer token")]
    Token(#[source] TokenError),
    /// The connection could not be established.
    #[error("connecting to the controller at {controller}")]
    Connect {
        controller: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The controller did not answer `Subscribe` in time.
    #[error("opening the config stream: no answer within {timeout:?}")]
    OpenTimeout { timeout: std::time::Duration },
    /// The controller refused the stream (e.g. `PERMISSION_DENIED`).
    #[error("opening the config stream")]
    Open(#[source] tonic::Status),
    /// The stream failed.
    #[error("config stream failed")]
    Receive(#[source] tonic::Status),
    /// The controller closed the stream.
    #[error("the controller closed the config stream")]
    Ended,
    /// Our side of the stream was closed under us.
    #[error("the config stream's request side closed")]
    RequestClosed,
}

enum StreamEnd {
    Stopped,
    Failed {
        error: StreamError,
        /// Whether the stream delivered at least one update (resets the backoff).
        progressed: bool,
    },
}

pub(super) struct Worker {
    config: SubscriptionConfig,
    validator: Arc<Validator>,
    shared: Arc<Shared>,
    state: watch::Sender<Arc<ConfigState>>,
    stop: watch::Receiver<bool>,
    /// `Hello.last_acked_version` on the next stream.
    last_acked_version: u64,
    /// The last failure logged at warn level (repeats go to debug).
    last_logged_error: Option<String>,
}

/// Loads and validates the state file, for publication before the first connect.
pub(super) fn load_initial(
    config: &SubscriptionConfig,
    validator: &Validator,
) -> (ConfigState, StateFileLoad) {
    let Some(path) = &config.state_file else {
        return (ConfigState::initial(), StateFileLoad::Disabled);
    };
    match load_from_disk(path, &config.subscriber, validator) {
        Ok(None) => {
            tracing::info!(path = %path.display(), "no config state file yet; waiting for the controller");
            (ConfigState::initial(), StateFileLoad::Missing)
        }
        Ok(Some(state)) => {
            tracing::info!(
                path = %path.display(),
                resources = state.resources.len(),
                version = state.version,
                "loaded the last-known-good config; serving on it until the controller answers"
            );
            let load = StateFileLoad::Loaded {
                resources: state.resources.len(),
                version: state.version,
            };
            (state, load)
        }
        Err(e) => {
            let error = error_chain(&e);
            tracing::error!(
                path = %path.display(),
                %error,
                "ignoring the config state file; starting with no config until the controller sends one"
            );
            (ConfigState::initial(), StateFileLoad::Failed { error })
        }
    }
}

fn load_from_disk(
    path: &Path,
    subscriber: &Subscriber,
    validator: &Validator,
) -> Result<Option<ConfigState>, LoadStateError> {
    let Some(saved) = persist::load(path)? else {
        return Ok(None);
    };
    let expected = subscriber.label();
    if saved.subscriber != expected {
        return Err(LoadStateError::OtherSubscriber {
            path: path.to_path_buf(),
            found: saved.subscriber,
            expected,
        });
    }
    let rejected = |source| LoadStateError::Rejected {
        path: path.to_path_buf(),
        source,
    };
    let mut errors = std::collections::BTreeMap::new();
    let mut resources = std::collections::BTreeMap::new();
    for resource in saved.resources {
        if let Err(e) = state::check_resource(&resource) {
            errors.insert(resource.key.clone(), e);
        } else if resources.contains_key(&resource.key) {
            errors.insert(resource.key.clone(), "appears more than once".to_owned());
        } else {
            resources.insert(resource.key.clone(), Arc::new(resource));
        }
    }
    if !errors.is_empty() {
        return Err(rejected(Rejection::from_resource_errors(errors)));
    }
    let proposed = ProposedState {
        upserted: resources.keys().cloned().collect(),
        removed: Default::default(),
        resources,
        version: saved.last_acked_version,
        is_full_snapshot: true,
        source: StateSource::FromDisk,
    };
    validator(&proposed).map_err(rejected)?;
    Ok(Some(ConfigState {
        resources: proposed.resources,
        version: saved.last_acked_version,
        generation: 1,
        source: StateSource::FromDisk,
        synced: false,
        controller_id: saved.controller_id,
        generated_at: saved
            .generated_at
            .as_ref()
            .and_then(|t| timestamp_from_proto(t).ok()),
    }))
}

impl Worker {
    pub(super) fn new(
        config: SubscriptionConfig,
        validator: Arc<Validator>,
        shared: Arc<Shared>,
        state: watch::Sender<Arc<ConfigState>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let last_acked_version = state.borrow().version;
        Self {
            config,
            validator,
            shared,
            state,
            stop,
            last_acked_version,
            last_logged_error: None,
        }
    }

    pub(super) async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            match self.run_stream().await {
                StreamEnd::Stopped => return,
                StreamEnd::Failed { error, progressed } => {
                    if progressed {
                        attempt = 0;
                    }
                    self.record_failure(&error);
                }
            }
            let delay = self.config.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            let mut stop = self.stop.clone();
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(delay) => {}
            }
            SubscriptionCounters::bump(&self.shared.counters.reconnects);
        }
    }

    fn record_failure(&mut self, error: &StreamError) {
        let text = error_chain(error);
        if self.last_logged_error.as_deref() == Some(text.as_str()) {
            tracing::debug!(error = %text, "config stream down; retrying");
        } else {
            tracing::warn!(
                controller = %self.config.controller,
                error = %text,
                "config stream down; serving on the config held and retrying"
            );
            self.last_logged_error = Some(text.clone());
        }
        self.shared.update_status(|s| {
            s.connected = false;
            s.last_error = Some(text);
        });
    }

    async fn run_stream(&mut self) -> StreamEnd {
        let mut stop = self.stop.clone();
        let opened = tokio::select! {
            () = stopped(&mut stop) => return StreamEnd::Stopped,
            opened = self.open() => opened,
        };
        let (requests, mut updates) = match opened {
            Ok(v) => v,
            Err(error) => {
                return StreamEnd::Failed {
                    error,
                    progressed: false,
                };
            }
        };
        SubscriptionCounters::bump(&self.shared.counters.streams_opened);
        self.shared.update_status(|s| s.connected = true);
        self.last_logged_error = None;
        tracing::info!(
            controller = %self.config.controller,
            subscriber = %self.config.subscriber,
            resources_held = self.state.borrow().resources.len(),
            "config stream open"
        );

        let mut progressed = false;
        let mut last_version = 0;
        loop {
            let received = tokio::select! {
                () = stopped(&mut stop) => return StreamEnd::Stopped,
                received = updates.message() => received,
            };
            let error = match received {
                Ok(Some(update)) => {
                    progressed = true;
                    let (reply, applied) = self.handle(update, &mut last_version);
                    // Reply first (the controller waits for it), then persist what is
                    // now held — even if the reply could not be sent: the next Hello
                    // reports the held versions either way.
                    let sent = requests.send(reply).await;
                    if let Some(state) = applied {
                        self.persist(state).await;
                    }
                    match sent {
                        Ok(()) => continue,
                        Err(_) => StreamError::RequestClosed,
                    }
                }
                Ok(None) => StreamError::Ended,
                Err(status) => StreamError::Receive(status),
            };
            return StreamEnd::Failed { error, progressed };
        }
    }

    /// Connects and opens `Subscribe` with `Hello` queued as the first message.
    async fn open(
        &self,
    ) -> Result<(mpsc::Sender<SubscribeRequest>, Streaming<ConfigUpdate>), StreamError> {
        let token = self
            .config
            .token
            .token()
            .await
            .map_err(StreamError::Token)?;
        let endpoint = crate::endpoint(&self.config.controller, self.config.connect_timeout);
        let channel = match self.config.socket_mark {
            None => endpoint.connect().await,
            Some(mark) => {
                endpoint
                    .connect_with_connector(crate::MarkedConnector::new(mark))
                    .await
            }
        }
        .map_err(|source| StreamError::Connect {
            controller: self.config.controller.to_string(),
            source,
        })?;
        let mut client = ConfigDiscoveryClient::new(channel)
            .max_decoding_message_size(ambit_api::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(ambit_api::MAX_MESSAGE_SIZE);
        // One Hello, then at most one reply per update: a small buffer never fills.
        let (requests, rx) = mpsc::channel(4);
        requests
            .send(self.hello())
            .await
            .map_err(|_| StreamError::RequestClosed)?;
        let mut request = Request::new(ReceiverStream::new(rx));
        token.apply(request.metadata_mut());
        let timeout = self.config.connect_timeout;
        let response = tokio::time::timeout(timeout, client.subscribe(request))
            .await
            .map_err(|_| StreamError::OpenTimeout { timeout })?
            .map_err(StreamError::Open)?;
        Ok((requests, response.into_inner()))
    }

    fn hello(&self) -> SubscribeRequest {
        let held = self.state.borrow();
        SubscribeRequest {
            kind: Some(subscribe_request::Kind::Hello(Hello {
                subscriber: Some(self.config.subscriber.to_proto()),
                resource_versions: held.resource_versions(),
                last_acked_version: self.last_acked_version,
                proxy_version: self.config.proxy_version.clone(),
            })),
        }
    }

    /// Applies or refuses one update: the reply to send, and the new state when one
    /// was published (to persist).
    fn handle(
        &mut self,
        update: ConfigUpdate,
        last_version: &mut u64,
    ) -> (SubscribeRequest, Option<Arc<ConfigState>>) {
        let counters = &self.shared.counters;
        SubscriptionCounters::bump(&counters.updates_received);
        let version = update.version;
        let controller_id = update.controller_id.clone();
        let generated_at = update
            .generated_at
            .as_ref()
            .and_then(|t| timestamp_from_proto(t).ok());
        let current = self.state.borrow().clone();

        let result = if version <= *last_version {
            Err(Rejection::new(format!(
                "update version {version} does not follow {last_version}: versions increase within a stream"
            )))
        } else {
            state::propose(&current, update).and_then(|p| (self.validator)(&p).map(|()| p))
        };
        *last_version = (*last_version).max(version);

        match result {
            Ok(proposed) => {
                SubscriptionCounters::bump(&counters.updates_applied);
                self.last_acked_version = version;
                self.shared.update_status(|s| {
                    s.controller_id.clone_from(&controller_id);
                });
                let first_sync = !current.synced;
                let changed = proposed.changes_anything()
                    || first_sync
                    || current.source != StateSource::FromController;
                let published = changed.then(|| {
                    let next = Arc::new(ConfigState {
                        resources: proposed.resources,
                        version,
                        generation: current.generation + 1,
                        source: StateSource::FromController,
                        synced: true,
                        controller_id,
                        generated_at,
                    });
                    self.state.send_replace(next.clone());
                    next
                });
                if first_sync {
                    tracing::info!(
                        version,
                        resources = published.as_ref().map_or(0, |s| s.resources.len()),
                        "config synced with the controller"
                    );
                } else {
                    tracing::debug!(
                        version,
                        upserted = proposed.upserted.len(),
                        removed = proposed.removed.len(),
                        "config update applied"
                    );
                }
                let ack = subscribe_request::Kind::Ack(Ack { version });
                (SubscribeRequest { kind: Some(ack) }, published)
            }
            Err(rejection) => {
                SubscriptionCounters::bump(&counters.nacks);
                tracing::warn!(
                    version,
                    error = %rejection.error,
                    "config update rejected; keeping the previous config"
                );
                self.shared.update_status(|s| {
                    s.last_nack = Some(NackStatus {
                        version,
                        error: rejection.error.clone(),
                        resource_errors: rejection.resource_errors.clone(),
                    });
                });
                let nack = subscribe_request::Kind::Nack(Nack {
                    version,
                    error: rejection.error,
                    resource_errors: rejection
                        .resource_errors
                        .into_iter()
                        .map(|(key, error)| ResourceError { key, error })
                        .collect(),
                });
                (SubscribeRequest { kind: Some(nack) }, None)
            }
        }
    }

    /// Writes `state` as the last-known-good config (off the async threads).
    async fn persist(&self, state: Arc<ConfigState>) {
        let Some(path) = self.config.state_file.clone() else {
            return;
        };
        let header = PersistedState {
            subscriber: self.config.subscriber.label(),
            resources: Vec::new(),
            last_acked_version: state.version,
            controller_id: state.controller_id.clone(),
            generated_at: state.generated_at.map(timestamp_to_proto),
            saved_at: Some(timestamp_to_proto(SystemTime::now())),
            proxy_version: self.config.proxy_version.clone(),
        };
        let generation = state.generation;
        let written = tokio::task::spawn_blocking(move || {
            let bytes = persist::encode(&header, state.resources.values().map(|r| &**r));
            persist::save(&path, &bytes).map_err(|e| error_chain(&e))
        })
        .await
        .unwrap_or_else(|e| Err(format!("writing the config state file: {e}")));
        match written {
            Ok(()) => self.shared.update_status(|s| {
                s.persisted_generation = generation;
                s.last_persist_error = None;
            }),
            Err(error) => {
                SubscriptionCounters::bump(&self.shared.counters.persist_failures);
                tracing::warn!(%error, "could not persist the config; a restart would not find it");
                self.shared
                    .update_status(|s| s.last_persist_error = Some(error));
            }
        }
    }
}

/// Resolves once the handle asked the task to stop (or was dropped).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

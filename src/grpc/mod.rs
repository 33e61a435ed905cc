//! tonic service implementations: decode the request, call one service
//! function, encode the answer. No business rule lives here.
//!
//! Also the access policy (which roles may call which path), the health and
//! reflection services, and the assembly of all of them into one [`Routes`].

mod admin;
mod checkin;
mod convert;
mod credits;
mod input;
mod packs;
mod payment;
mod subscriptions;
mod usage;

use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};

use crate::{
    auth::{Access, Role},
    pb,
    state::AppState,
};

const USER_ROLES: &[Role] = &[Role::User, Role::Admin];
const ADMIN_ROLES: &[Role] = &[Role::Admin];
const SERVICE_ROLES: &[Role] = &[Role::Service];

/// The fully-qualified names of the billing services.
pub const SERVICE_NAMES: [&str; 7] = [
    pb::credits_service_server::SERVICE_NAME,
    pb::packs_service_server::SERVICE_NAME,
    pb::subscriptions_service_server::SERVICE_NAME,
    pb::checkin_service_server::SERVICE_NAME,
    pb::payment_service_server::SERVICE_NAME,
    pb::admin_service_server::SERVICE_NAME,
    pb::usage_service_server::SERVICE_NAME,
];

/// Paths callable without a token (CONTRACT §2).
const PUBLIC_METHODS: &[&str] = &[
    "/billing.v1.PacksService/ListPacks",
    "/billing.v1.CreditsService/ListRates",
    "/billing.v1.SubscriptionsService/ListPlans",
    "/billing.v1.PaymentService/HandleStripeWebhook",
    "/billing.v1.PaymentService/HandleCreemWebhook",
];

/// Who may call a gRPC path: `UsageService` is for role `service`,
/// `AdminService` for `admin`, every other billing method for `user` and
/// `admin` (on the token's own organization), apart from the public ones.
/// Health and reflection are public.
pub fn access_policy(path: &str) -> Access {
    if !path.starts_with("/billing.v1.") || PUBLIC_METHODS.contains(&path) {
        return Access::Public;
    }
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    if service == pb::usage_service_server::SERVICE_NAME {
        Access::Roles(SERVICE_ROLES)
    } else if service == pb::admin_service_server::SERVICE_NAME {
        Access::Roles(ADMIN_ROLES)
    } else {
        Access::Roles(USER_ROLES)
    }
}

/// Every billing service plus health and reflection (v1 and v1alpha).
/// Largest request message a service decodes (REST's body limit too);
/// a larger one is refused with RESOURCE_EXHAUSTED before it is read whole.
pub const MAX_MESSAGE_BYTES: usize = crate::gateway::MAX_BODY_BYTES;

pub fn routes(
    state: &AppState,
    health: HealthServer<impl Health>,
) -> Result<Routes, tonic_reflection::server::Error> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    Ok(Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::credits_service_server::CreditsServiceServer::new(credits::CreditsApi::new(
                state.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::packs_service_server::PacksServiceServer::new(packs::PacksApi::new(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::subscriptions_service_server::SubscriptionsServiceServer::new(
                subscriptions::SubscriptionsApi::new(state.clone()),
            )
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::checkin_service_server::CheckinServiceServer::new(checkin::CheckinApi::new(
                state.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::payment_service_server::PaymentServiceServer::new(payment::PaymentApi::new(
                state.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(admin::AdminApi::new(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::usage_service_server::UsageServiceServer::new(usage::UsageApi::new(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        ))
}

/// Sets the overall (`""`) and every billing service's health status.
pub async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_by_path() {
        assert_eq!(
            access_policy("/billing.v1.PacksService/ListPacks"),
            Access::Public
        );
        assert_eq!(
            access_policy("/grpc.health.v1.Health/Check"),
            Access::Public
        );
        assert_eq!(
            access_policy("/billing.v1.UsageService/Consume"),
            Access::Roles(SERVICE_ROLES)
        );
        assert_eq!(
            access_policy("/billing.v1.AdminService/ListPlans"),
            Access::Roles(ADMIN_ROLES)
        );
        assert_eq!(
            access_policy("/billing.v1.CreditsService/GetBalance"),
            Access::Roles(USER_ROLES)
        );
    }
}

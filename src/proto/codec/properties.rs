//! MQTT 5.0 properties (§2.2.2): one struct holding every property, with the
//! decoder checking which identifiers each packet type allows.

use bytes::Bytes;
use bytestring::ByteString;

/// Every MQTT 5.0 property. Unset ones are `None` / empty. Which may appear
/// depends on the packet; the decoder enforces that and rejects duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// 0x01 Payload Format Indicator (PUBLISH, will).
    pub payload_format_indicator: Option<u8>,
    /// 0x02 Message Expiry Interval, seconds (PUBLISH, will).
    pub message_expiry_interval: Option<u32>,
    /// 0x03 Content Type (PUBLISH, will).
    pub content_type: Option<ByteString>,
    /// 0x08 Response Topic (PUBLISH, will).
    pub response_topic: Option<ByteString>,
    /// 0x09 Correlation Data (PUBLISH, will).
    pub correlation_data: Option<Bytes>,
    /// 0x0B Subscription Identifier: one in SUBSCRIBE, any number in PUBLISH.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11 Session Expiry Interval, seconds (CONNECT, CONNACK, DISCONNECT).
    pub session_expiry_interval: Option<u32>,
    /// 0x12 Assigned Client Identifier (CONNACK).
    pub assigned_client_identifier: Option<ByteString>,
    /// 0x13 Server Keep Alive, seconds (CONNACK).
    pub server_keep_alive: Option<u16>,
    /// 0x15 Authentication Method (CONNECT, CONNACK, AUTH).
    pub authentication_method: Option<ByteString>,
    /// 0x16 Authentication Data (CONNECT, CONNACK, AUTH).
    pub authentication_data: Option<Bytes>,
    /// 0x17 Request Problem Information (CONNECT).
    pub request_problem_information: Option<u8>,
    /// 0x18 Will Delay Interval, seconds (will).
    pub will_delay_interval: Option<u32>,
    /// 0x19 Request Response Information (CONNECT).
    pub request_response_information: Option<u8>,
    /// 0x1A Response Information (CONNACK).
    pub response_information: Option<ByteString>,
    /// 0x1C Server Reference (CONNACK, DISCONNECT).
    pub server_reference: Option<ByteString>,
    /// 0x1F Reason String (CONNACK, acks, DISCONNECT, AUTH).
    pub reason_string: Option<ByteString>,
    /// 0x21 Receive Maximum (CONNECT, CONNACK); never 0.
    pub receive_maximum: Option<u16>,
    /// 0x22 Topic Alias Maximum (CONNECT, CONNACK).
    pub topic_alias_maximum: Option<u16>,
    /// 0x23 Topic Alias (PUBLISH); never 0.
    pub topic_alias: Option<u16>,
    /// 0x24 Maximum QoS (CONNACK): 0 or 1.
    pub maximum_qos: Option<u8>,
    /// 0x25 Retain Available (CONNACK): 0 or 1.
    pub retain_available: Option<u8>,
    /// 0x26 User Property: any number, order kept, in every packet with properties.
    pub user_properties: Vec<(ByteString, ByteString)>,
    /// 0x27 Maximum Packet Size (CONNECT, CONNACK); never 0.
    pub maximum_packet_size: Option<u32>,
    /// 0x28 Wildcard Subscription Available (CONNACK): 0 or 1.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29 Subscription Identifier Available (CONNACK): 0 or 1.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A Shared Subscription Available (CONNACK): 0 or 1.
    pub shared_subscription_available: Option<u8>,
}

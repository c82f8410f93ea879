//! Test vectors: packets captured from MariaDB 10.11.19 and its `mariadb` command-line client on
//! 127.0.0.1, header included, as hex. They pin the parsers to what real peers send.

/// Decodes a hex test vector (whitespace ignored).
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ascii hex");
            u8::from_str_radix(pair, 16).expect("hex digit")
        })
        .collect()
}

/// The payload of a hex test vector (the 4-byte header removed).
pub(crate) fn payload(s: &str) -> Vec<u8> {
    hex(s).split_off(4)
}

/// A greeting in the shape MySQL 8.0 sends (CLIENT_MYSQL set, so no MariaDB capabilities;
/// CLIENT_SSL, COMPRESS and ZSTD advertised; `caching_sha2_password`), payload only.
pub(crate) fn mysql8_greeting() -> Vec<u8> {
    let mut p = vec![10];
    p.extend_from_slice(b"8.0.36\0");
    p.extend_from_slice(&42u32.to_le_bytes());
    p.extend_from_slice(b"abcdefgh");
    p.push(0);
    p.extend_from_slice(&0xffffu16.to_le_bytes());
    p.push(0xff);
    p.extend_from_slice(&0x0002u16.to_le_bytes());
    p.extend_from_slice(&0xdfffu16.to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(b"ijklmnopqrst\0");
    p.extend_from_slice(b"caching_sha2_password\0");
    p
}

/// The greeting of MariaDB 10.11.19 (Debian 12), as it arrives (seq 0). `5.5.5-` prefix, CLIENT_MYSQL
/// clear (MariaDB extended capabilities `0x1d` in the reserved bytes), no CLIENT_SSL.
pub(crate) const GREETING: &str = concat!(
    "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465",
    "6231327531000a000000223c47326174463c00fef72d0200ff81150000000000",
    "001d0000003d5a2f7834385a3c5c3c5824006d7973716c5f6e61746976655f70",
    "617373776f726400",
);

/// The SSLRequest of the `mariadb` 10.11 CLI (`--ssl`), seq 1: exactly 32 bytes of payload.
pub(crate) const SSL_REQUEST: &str = concat!(
    "2000000184aabf00000010002100000000000000000000000000000000000000",
    "1d000000",
);

/// A plaintext HandshakeResponse41 of the same CLI (`--skip-ssl`, user root, empty password,
/// `mysql_native_password`, connection attributes), seq 1.
pub(crate) const RESPONSE_PLAIN: &str = concat!(
    "bc00000184a2bf00000010002100000000000000000000000000000000000000",
    "1d000000726f6f7400006d7973716c5f6e61746976655f70617373776f726400",
    "7f035f6f73054c696e75780c5f636c69656e745f6e616d650a6c69626d617269",
    "616462045f7069640531383931310f5f636c69656e745f76657273696f6e0633",
    "2e332e3230095f706c6174666f726d067838365f36340c70726f6772616d5f6e",
    "616d65056d7973716c0c5f7365727665725f686f7374093132372e302e302e31",
);

/// The server's OK to [`RESPONSE_PLAIN`], seq 2.
pub(crate) const OK_PLAIN: &str = "0700000200000002000000";

/// A HandshakeResponse41 with a database (`-Dmysql`) and the client plugin `client_ed25519`,
/// which makes the server switch to `mysql_native_password`; seq 1.
pub(crate) const RESPONSE_WITH_DB: &str = concat!(
    "bb0000018ca2bf00000010002100000000000000000000000000000000000000",
    "1d000000726f6f7400006d7973716c00636c69656e745f65643235353139007f",
    "035f6f73054c696e75780c5f636c69656e745f6e616d650a6c69626d61726961",
    "6462045f7069640531393136370f5f636c69656e745f76657273696f6e06332e",
    "332e3230095f706c6174666f726d067838365f36340c70726f6772616d5f6e61",
    "6d65056d7973716c0c5f7365727665725f686f7374093132372e302e302e31",
);

/// The AuthSwitchRequest (`0xfe`) that follows [`RESPONSE_WITH_DB`], seq 2.
pub(crate) const AUTH_SWITCH: &str = concat!(
    "2c000002fe6d7973716c5f6e61746976655f70617373776f72640055333b6d38",
    "6c3a79755e577b243f50563e734b5c00",
);

/// The client's answer to [`AUTH_SWITCH`] for an empty password: an empty packet, seq 3.
pub(crate) const EMPTY_REPLY: &str = "00000003";

/// The OK that ends that exchange (with session-state information), seq 4.
pub(crate) const OK_WITH_DB: &str = "110000040000000240000000080106056d7973716c";

/// A HandshakeResponse41 carrying a 20-byte `mysql_native_password` scramble, seq 1.
pub(crate) const RESPONSE_WITH_PASSWORD: &str = concat!(
    "d000000184a2bf00000010002100000000000000000000000000000000000000",
    "1d000000726f6f74001407e32ee855f27e1b175354b8c6a117bb7d0bc7826d79",
    "73716c5f6e61746976655f70617373776f7264007f035f6f73054c696e75780c",
    "5f636c69656e745f6e616d650a6c69626d617269616462045f70696405313932",
    "31350f5f636c69656e745f76657273696f6e06332e332e3230095f706c617466",
    "6f726d067838365f36340c70726f6772616d5f6e616d65056d7973716c0c5f73",
    "65727665725f686f7374093132372e302e302e31",
);

/// The ERR the server answers [`RESPONSE_WITH_PASSWORD`] with (1045), seq 2.
pub(crate) const ACCESS_DENIED: &str = concat!(
    "48000002ff15042332383030304163636573732064656e69656420666f722075",
    "7365722027726f6f742740273132372e302e302e312720287573696e67207061",
    "7373776f72643a2059455329",
);

/// A whole connection phase as a relay's two sides see it, in order: the greeting, an
/// SSLRequest, then a response that gets switched to another plugin and accepted.
pub(crate) const EXCHANGE: [&str; 6] = [
    GREETING,
    SSL_REQUEST,
    RESPONSE_WITH_DB,
    AUTH_SWITCH,
    EMPTY_REPLY,
    OK_WITH_DB,
];

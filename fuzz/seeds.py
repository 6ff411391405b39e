#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Usage: python3 fuzz/seeds.py

The seeds are valid inputs (MQTT 3.1.1 and 5 frames, PROXY v1/v2 headers, MessagePack
payloads of every topic kind, the shipped rules), written from the specifications by hand so
that nothing but Python is needed. Re-running rewrites the same files; the fuzzer's own
corpus entries (named by their SHA-1) are left alone.
"""
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- MessagePack (the subset the schema uses) -------------------------------------------

def mp(v):
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if 0 <= v < 2**8:
            return b"\xcc" + struct.pack(">B", v)
        if 0 <= v < 2**16:
            return b"\xcd" + struct.pack(">H", v)
        if 0 <= v < 2**32:
            return b"\xce" + struct.pack(">I", v)
        if 0 <= v:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xca" + struct.pack(">f", v)
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        return b"\xd9" + bytes([len(b)]) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        return bytes([0x90 | len(v)]) + b"".join(mp(x) for x in v)
    if isinstance(v, dict):
        return bytes([0x80 | len(v)]) + b"".join(mp(k) + mp(x) for k, x in v.items())
    raise TypeError(v)


# Topic kinds in TopicKind::ALL order: the harness's selector byte.
KINDS = ["status", "telemetry", "button", "audio_up", "session_up", "audio_down",
         "session_down", "led", "persona", "config"]

PAYLOADS = {
    "status": {"v": 1, "online": True, "agent_version": "0.1.0", "boot_id": "b-1", "ts_ms": 1700000000000},
    "telemetry": {"v": 1, "seq": 42, "ts_ms": 1700000000000, "uptime_s": 3600, "battery_pct": 87.5,
                  "cpu_temp_c": 51.0, "rssi_dbm": -61, "free_mem_kb": 120000, "extra": {"fan_rpm": 1200.0}},
    "button": {"v": 1, "seq": 3, "ts_ms": 1700000000000, "button": "talk", "action": "long_press"},
    "audio_up": {"v": 1, "session_id": "s-1", "seq": 0, "ts_ms": 1700000000000, "codec": "opus",
                 "sample_rate": 16000, "frame_ms": 20, "frames": [b"\xf8\xff\xfe", b"\x78\x01"], "last": False},
    "session_up": {"v": 1, "session_id": "s-1", "action": "start", "reason": "button"},
    "audio_down": {"v": 1, "session_id": "s-1", "seq": 9, "ts_ms": 1700000000000, "codec": "opus",
                   "sample_rate": 16000, "frame_ms": 20, "frames": [], "last": True},
    "session_down": {"v": 1, "session_id": "s-1", "state": "speaking", "transcript": "hello",
                     "reply_text": "hi there"},
    "led": {"v": 1, "pattern": "pulse", "color": [255, 160, 0], "brightness": 180, "duration_ms": 10000},
    "persona": {"v": 1, "persona_id": "sage", "name": "Sage", "color": [0, 128, 255], "voice": "en-gb",
                "switched_at_ms": 1700000000000, "trigger": "button"},
    "config": {"v": 1, "telemetry_interval_s": 30, "volume": 70, "buttons": {"b1": "talk"},
               "led_brightness": 200},
}


def schema_seeds():
    for i, kind in enumerate(KINDS):
        write("schema_decode", kind, bytes([i]) + mp(PAYLOADS[kind]))
    write("schema_decode", "topic", "devices/pi-1/audio/up")
    write("schema_decode", "version-0", bytes([7]) + mp(dict(PAYLOADS["led"], v=0)))
    write("schema_decode", "newer-version", bytes([0]) + mp(dict(PAYLOADS["status"], v=2, new=1)))


# --- MQTT ------------------------------------------------------------------------------

def varint(n):
    out = b""
    while True:
        b = n % 128
        n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x


def packet(byte1, body):
    return bytes([byte1]) + varint(len(body)) + body


def props(p):
    return varint(len(p)) + p


def connect(v5, will=True):
    flags = 0x02 | 0x80 | 0x40  # clean start, username, password
    if will:
        flags |= 0x04 | 0x20 | 0x08  # will, will retain, will QoS 1
    body = s("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", 30)
    if v5:
        body += props(b"\x11" + struct.pack(">I", 0) + b"\x22" + struct.pack(">H", 16))
    body += s("pi-1")
    if will:
        if v5:
            body += props(b"\x01\x01" + b"\x03" + s("application/msgpack"))
        body += s("devices/pi-1/status") + s(mp(PAYLOADS["status"] | {"online": False}))
    body += s("pi-1") + s("token-abc")
    return packet(0x10, body)


def publish(v5, topic, payload, qos=0, pkid=1, retain=False, p=b""):
    body = s(topic)
    if qos:
        body += struct.pack(">H", pkid)
    if v5:
        body += props(p)
    return packet(0x30 | (qos << 1) | int(retain), body + payload)


def subscribe(v5, filters, pkid=2):
    body = struct.pack(">H", pkid) + (props(b"") if v5 else b"")
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return packet(0x82, body)


def unsubscribe(v5, filters, pkid=3):
    body = struct.pack(">H", pkid) + (props(b"") if v5 else b"")
    for f in filters:
        body += s(f)
    return packet(0xA2, body)


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def session(v5):
    tele = mp(PAYLOADS["telemetry"])
    alias = b"\x23\x00\x01"
    out = connect(v5)
    out += publish(v5, "devices/pi-1/telemetry", tele, qos=1, pkid=10)
    out += publish(v5, "devices/pi-1/status", mp(PAYLOADS["status"]), qos=1, pkid=11, retain=True)
    out += publish(v5, "devices/pi-1/audio/up", mp(PAYLOADS["audio_up"]), p=alias if v5 else b"")
    if v5:
        out += publish(v5, "", mp(PAYLOADS["audio_up"]), p=alias)
    out += publish(v5, "devices/pi-1/button", mp(PAYLOADS["button"]), qos=2, pkid=12)
    out += packet(0x62, struct.pack(">H", 12))  # PUBREL
    out += subscribe(v5, [("devices/pi-1/led", 1), ("devices/pi-1/audio/down", 0)])
    out += packet(0x40, struct.pack(">H", 1))  # PUBACK
    out += unsubscribe(v5, ["devices/pi-1/led"])
    out += PINGREQ + DISCONNECT
    return out


def packet_seeds():
    # Control byte: low two bits pick the size limit (2: 64 KiB), the rest the read size.
    whole, bytewise, small = 0x02 | (63 << 2), 0x02, 0x01 | (7 << 2)
    for v5, tag in [(False, "v4"), (True, "v5")]:
        write("packet_framing", f"{tag}-connect", bytes([whole]) + connect(v5))
        write("packet_framing", f"{tag}-connect-no-will", bytes([small]) + connect(v5, will=False))
        write("packet_framing", f"{tag}-session", bytes([whole]) + session(v5))
        write("packet_framing", f"{tag}-session-bytewise", bytes([bytewise]) + session(v5))
    write("packet_framing", "oversized", bytes([0x00 | (63 << 2)])
          + publish(False, "devices/pi-1/telemetry", b"x" * 64))
    write("packet_framing", "bad-length", bytes([whole]) + b"\x30\xff\xff\xff\xff\x01")
    write("packet_framing", "foreign-topic", bytes([whole]) + connect(False, will=False)
          + publish(False, "$share/g/devices/+/led", b"x") + subscribe(False, [("#", 1)]))


# --- PROXY protocol -----------------------------------------------------------------------

V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd, fam, body):
    return V2 + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(body)) + body


def proxy_seeds():
    mqtt = connect(False, will=False)
    write("proxy_header", "v1-tcp4", b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8883\r\n" + mqtt)
    write("proxy_header", "v1-tcp6", b"PROXY TCP6 2001:db8::5 2001:db8::1 4000 8883\r\n" + mqtt)
    write("proxy_header", "v1-unknown", b"PROXY UNKNOWN\r\n" + mqtt)
    ipv4 = bytes([198, 51, 100, 9, 10, 0, 0, 1]) + struct.pack(">HH", 8080, 8883)
    write("proxy_header", "v2-tcp4", v2(1, 0x11, ipv4) + mqtt)
    write("proxy_header", "v2-tcp4-tlv", v2(1, 0x11, ipv4 + b"\x04\x00\x01\xaa") + mqtt)
    ipv6 = bytes.fromhex("20010db8000000000000000000000042") + bytes(16) + struct.pack(">HH", 443, 8883)
    write("proxy_header", "v2-tcp6", v2(1, 0x21, ipv6) + mqtt)
    write("proxy_header", "v2-local", v2(0, 0x00, b"") + mqtt)
    write("proxy_header", "v2-unix", v2(1, 0x31, bytes(216)))
    write("proxy_header", "forwarded",
          "10.0.0.0/8,::1/128,192.168.1.5\n203.0.113.9, 10.0.0.2\n[2001:db8::1]:443, 198.51.100.1:80\n")
    write("proxy_header", "forwarded-all", "0.0.0.0/0, ::/0\n1.2.3.4\n")


# --- Rules --------------------------------------------------------------------------------

def rule_seeds():
    with open(os.path.join(ROOT, "..", "backend", "rules.toml"), "rb") as f:
        write("rule_parse", "shipped", f.read())
    write("rule_parse", "every-action", """[[rule]]
name = "all"
on = "telemetry"
topic = "devices/+/telemetry"
if = 'has(event.battery_pct) && event.battery_pct < 15.0 && device.online && now > 0'
do = [
  { persona = "sage" },
  { led = { pattern = "blink", color = "#00ff00", brightness = 7, duration_ms = 500 } },
  { session = "cancel" },
  { say = "battery low" },
  { publish = { topic = "led", payload = { pattern = "solid", color = [1, 2, 3], brightness = 9 } } },
  { config = { telemetry_interval_s = 60, volume = 40, led_brightness = 100, buttons = { b1 = "talk" } } },
  { log = "x" },
]
""")
    write("rule_parse", "cel", """[[rule]]
name = "cel"
on = "transcript"
if = '[1, 2, 3].exists(x, x > 2) && {"a": 1}["a"] == 1 && size(event.text) > 3 && event.text.startsWith("sw") && int("5") + 2 * 3 % 4 - 1 >= 0 && 2.5 / 0.5 == 5.0 && event.text.matches("(?i)sage")'
do = [{ persona = "named" }]
""")
    write("rule_parse", "broken", "[[rule]]\nname = \"broken\"\non = \"button\"\nif = 'event.button == '\ndo = [{ log = \"x\" }]\n")


if __name__ == "__main__":
    schema_seeds()
    packet_seeds()
    proxy_seeds()
    rule_seeds()

"""Connects paho-mqtt 2.x clients one after another, keeping each open, and
prints one JSON line per CONNACK with the MQTT 3.x return code.

    python paho_connect.py PORT SPEC_JSON

SPEC_JSON is a list of {"client_id", "protocol": "311"|"31", "clean",
"username", "password"}; all but client_id are optional. A client that paho
itself refuses to create prints {"error": ...} instead.
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt

# paho 2.x reports 3.x CONNACK codes as 5.0 reason codes; map them back.
V3_CODE = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}


def out(obj):
    print(json.dumps(obj), flush=True)


def connect(port, spec):
    protocol = mqtt.MQTTv31 if spec.get("protocol") == "31" else mqtt.MQTTv311
    try:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=spec["client_id"],
            protocol=protocol,
            clean_session=spec.get("clean", True),
        )
    except ValueError as e:
        out({"client_id": spec["client_id"], "error": str(e)})
        return None
    if spec.get("username") is not None:
        client.username_pw_set(spec["username"], spec.get("password"))
    done = threading.Event()
    result = {}

    def on_connect(_client, _userdata, flags, reason_code, _properties):
        result["rc"] = V3_CODE.get(reason_code.getName(), -1)
        result["name"] = reason_code.getName()
        result["session_present"] = bool(flags.session_present)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not done.wait(8):
        out({"client_id": spec["client_id"], "error": "no CONNACK within 8 s"})
    else:
        out(dict(client_id=spec["client_id"], **result))
    if result.get("rc") != 0:
        # Refused: stop paho from retrying.
        client.disconnect()
        client.loop_stop()
        return None
    return client


def main():
    port = int(sys.argv[1])
    specs = json.loads(sys.argv[2])
    clients = [connect(port, s) for s in specs]
    for c in clients:
        if c is not None:
            c.disconnect()
            c.loop_stop()


if __name__ == "__main__":
    main()

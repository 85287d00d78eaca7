// MQTT.js over WebSocket (ws:// or wss://) against coremq; one JSON line per
// event. MQTT.js offers the subprotocol "mqtt" (MQTT-6.0.0-3).
//   node mqttjs_ws.js URL CA_FILE|- roundtrip CLIENT_ID TOPIC
//       subscribes to TOPIC at QoS 1, publishes "<CLIENT_ID> says hi" at
//       QoS 1 and prints {"event":"done","granted":1,"topic",...,"qos"}
//       once it came back.
//   node mqttjs_ws.js URL CA_FILE|- sub CLIENT_ID FILTER COUNT
//       prints {"event":"ready"} once the SUBACK grants FILTER (QoS 1),
//       then {"event":"message",...} per message; exits after COUNT.
// CA_FILE is the PEM the wss server's certificate must chain to.
'use strict';
const fs = require('fs');
const mqtt = require('mqtt');

const [url, caFile, mode, clientId, topic, count] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const fail = (o) => { out(o); process.exit(1); };

const opts = {
  clientId,
  clean: true,
  protocolVersion: 4,
  reconnectPeriod: 0,
  connectTimeout: 5000,
};
if (caFile !== '-') opts.ca = fs.readFileSync(caFile);

const client = mqtt.connect(url, opts);
let left = Number(count || 1);
let granted = null;
let ending = false;

client.on('connect', (connack) => {
  client.subscribe(topic, { qos: 1 }, (err, g) => {
    if (err) fail({ event: 'error', message: String(err.message) });
    granted = g[0].qos;
    if (mode === 'sub') {
      out({ event: 'ready', granted, returnCode: connack.returnCode });
      return;
    }
    client.publish(topic, `${clientId} says hi`, { qos: 1 }, (e) => {
      if (e) fail({ event: 'error', message: String(e.message) });
    });
  });
});
client.on('message', (t, payload, packet) => {
  const m = { topic: t, payload: payload.toString(), qos: packet.qos };
  if (mode === 'sub') {
    out({ event: 'message', ...m });
    if (--left > 0) return;
  } else {
    out({ event: 'done', granted, ...m });
  }
  ending = true;
  client.end(false, {}, () => process.exit(0));
});
client.on('error', (err) => fail({ event: 'error', message: String(err && err.message) }));
client.on('close', () => { if (!ending) fail({ event: 'closed' }); });
setTimeout(() => fail({ event: 'timeout' }), 15000);

// Subscribes with MQTT.js, prints {"event":"ready"} once the SUBACK grants
// the subscription, then one JSON line per message; exits after COUNT.
//   node mqttjs_sub.js PORT CLIENT_ID FILTER QOS COUNT
'use strict';
const mqtt = require('mqtt');

const [port, clientId, filter, qos, count] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
let left = Number(count);

const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
  clientId,
  clean: true,
  protocolVersion: 4,
  reconnectPeriod: 0,
  connectTimeout: 5000,
});
client.on('connect', () => {
  client.subscribe(filter, { qos: Number(qos) }, (err, granted) => {
    if (err) {
      out({ event: 'error', message: String(err.message) });
      process.exit(1);
    }
    out({ event: 'ready', granted: granted.map((g) => g.qos) });
  });
});
client.on('message', (topic, payload, packet) => {
  out({ event: 'message', topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain });
  if (--left <= 0) client.end(false, {}, () => process.exit(0));
});
client.on('error', (err) => {
  out({ event: 'error', message: String(err && err.message) });
  process.exit(1);
});
setTimeout(() => { out({ event: 'timeout' }); process.exit(2); }, 15000);

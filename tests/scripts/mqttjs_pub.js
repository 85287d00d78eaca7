// Publishes each MESSAGE with MQTT.js at QOS (waiting for PUBACK at QoS 1),
// prints {"event":"done"} and exits.
//   node mqttjs_pub.js PORT CLIENT_ID TOPIC QOS MESSAGE...
'use strict';
const mqtt = require('mqtt');

const [port, clientId, topic, qos, ...messages] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
  clientId,
  clean: true,
  protocolVersion: 4,
  reconnectPeriod: 0,
  connectTimeout: 5000,
});
client.on('connect', async () => {
  try {
    for (const m of messages) {
      await client.publishAsync(topic, m, { qos: Number(qos) });
    }
    out({ event: 'done', sent: messages.length });
    client.end(false, {}, () => process.exit(0));
  } catch (err) {
    out({ event: 'error', message: String(err && err.message) });
    process.exit(1);
  }
});
client.on('error', (err) => {
  out({ event: 'error', message: String(err && err.message) });
  process.exit(1);
});
setTimeout(() => { out({ event: 'timeout' }); process.exit(2); }, 15000);

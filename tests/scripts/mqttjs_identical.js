// Stays connected as CLIENT_ID with MQTT.js's automatic reconnect, printing
// one JSON line per client event. Two of these with the same id take each
// other over again and again. Runs until killed.
//   node mqttjs_identical.js PORT CLIENT_ID RECONNECT_PERIOD_MS
'use strict';
const mqtt = require('mqtt');

const [port, clientId, period] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
  clientId,
  clean: true,
  protocolVersion: 4,
  reconnectPeriod: Number(period),
  connectTimeout: 5000,
  keepalive: 30,
});
for (const ev of ['connect', 'close', 'offline', 'reconnect']) {
  client.on(ev, () => out({ event: ev }));
}
client.on('error', (err) => out({ event: 'error', message: String(err && err.message) }));
setTimeout(() => process.exit(3), 30000); // a backstop; the test kills us sooner

// Connects once with MQTT.js and prints the CONNACK as one JSON line, then
// disconnects (DISCONNECT, so a persistent session is kept) and exits.
//   node mqttjs_connect.js PORT CLIENT_ID CLEAN(true|false)
'use strict';
const mqtt = require('mqtt');

const [port, clientId, clean] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
  clientId,
  clean: clean === 'true',
  protocolVersion: 4,
  reconnectPeriod: 0,
  connectTimeout: 5000,
});
client.on('connect', (connack) => {
  out({ event: 'connect', sessionPresent: connack.sessionPresent, returnCode: connack.returnCode });
  client.end(false, {}, () => process.exit(0));
});
client.on('error', (err) => {
  out({ event: 'error', message: String(err && err.message), code: err && err.code });
  process.exit(1);
});
setTimeout(() => { out({ event: 'timeout' }); process.exit(2); }, 8000);

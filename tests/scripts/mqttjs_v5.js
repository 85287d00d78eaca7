// MQTT.js with protocolVersion 5, for tests/v5_mqttjs.rs. One script, three
// modes; every event is printed as one flat JSON line (MQTT 5 properties are
// flattened into the line, objects and arrays as JSON text in a string).
//
//   node mqttjs_v5.js connect PORT SPEC_JSON
//       Connects, prints {"event":"connect", sessionPresent, reasonCode,
//       <CONNACK properties>}, optionally subscribes (spec.subs, prints
//       "subscribed"), then DISCONNECTs (spec.disconnect: reason code /
//       properties of the DISCONNECT) and exits 0.
//   node mqttjs_v5.js sub PORT SPEC_JSON
//       Connects, subscribes (spec.subs), prints {"event":"ready", granted},
//       publishes spec.publish (if any, printing "published"), then prints one
//       "message" line per PUBLISH received; ends (DISCONNECT, exit 0) after
//       spec.count messages when count > 0, else runs until killed. Prints
//       "disconnect" (with the server's reason code), "close", "error" too.
//   node mqttjs_v5.js pub PORT SPEC_JSON
//       Connects, publishes spec.publish in order (awaiting each PUBACK /
//       PUBCOMP), prints {"event":"done"}, DISCONNECTs and exits 0.
//
// SPEC_JSON keys (all optional):
//   clientId, clean (default true), properties (CONNECT properties, as
//   MQTT.js names them: sessionExpiryInterval, topicAliasMaximum, ...),
//   keepalive, subs: [{filter, qos, nl, rap, rh, id}] (id = Subscription
//   Identifier), publish: [{topic, payload, qos, retain, properties}],
//   count, quietMs (sub: end this long after the publishes), disconnect:
//   {reasonCode, properties}, timeoutMs (default 15000),
//   will: {topic, payload, qos, retain, properties},
//   abort: true (connect: drop the socket instead of sending DISCONNECT),
//   unsubs: [filter] (connect: after subs, one UNSUBSCRIBE each, printing
//   {"event":"unsubscribed", filter, codes}),
//   autoAlias: true (MQTT.js assigns Topic Aliases to what it publishes,
//   up to the server's Topic Alias Maximum),
//   logAcks: true (print each PUBACK / PUBREC / UNSUBACK with its reason
//   code as {"event":"ack"}),
//   holdAcksMs: N (sub: print {"event":"arrived"} per QoS 1/2 PUBLISH and
//   hold all acknowledgements from the first arrival for N ms, then send
//   them and print {"event":"released", held}).
'use strict';
const mqtt = require('mqtt');

const [mode, port, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson || '{}');
// Every line carries t, the wall clock in ms when it was printed.
const out = (o) => process.stdout.write(JSON.stringify(Object.assign(o, { t: Date.now() })) + '\n');

// Scalars stay scalars; Buffers become utf8 text (+ hex); anything else
// (userProperties objects, subscriptionIdentifier arrays) JSON text.
function flatten(props, into) {
  for (const [k, v] of Object.entries(props || {})) {
    if (Buffer.isBuffer(v)) {
      into[k] = v.toString('utf8');
      into[k + 'Hex'] = v.toString('hex');
    } else if (v !== null && typeof v === 'object') {
      into[k] = JSON.stringify(v);
    } else {
      into[k] = v;
    }
  }
  return into;
}

function publishOpts(m) {
  const props = Object.assign({}, m.properties || {});
  // Correlation Data is binary: given as text or (correlationDataHex) hex.
  if (typeof props.correlationData === 'string') {
    props.correlationData = Buffer.from(props.correlationData, 'utf8');
  }
  if (typeof props.correlationDataHex === 'string') {
    props.correlationData = Buffer.from(props.correlationDataHex, 'hex');
    delete props.correlationDataHex;
  }
  return { qos: m.qos || 0, retain: !!m.retain, properties: props };
}

const opts = {
  protocolVersion: 5,
  clean: spec.clean === undefined ? true : spec.clean,
  reconnectPeriod: 0,
  connectTimeout: 5000,
  // Every subscribe is sent, even one repeating a filter (Retain Handling 1).
  resubscribe: false,
  keepalive: spec.keepalive === undefined ? 60 : spec.keepalive,
  properties: spec.properties || {},
};
// An empty clientId is sent as such (MQTT.js would otherwise make one up).
if (spec.clientId !== undefined) opts.clientId = spec.clientId;
if (spec.autoAlias) opts.autoAssignTopicAlias = true;
if (spec.will) {
  const w = spec.will;
  opts.will = {
    topic: w.topic,
    payload: Buffer.from(w.payload || '', 'utf8'),
    qos: w.qos || 0,
    retain: !!w.retain,
    properties: w.properties,
  };
}
let held = null;
if (spec.holdAcksMs) {
  opts.customHandleAcks = (topic, message, packet, done) => {
    out({ event: 'arrived', topic, payload: message.toString(), qos: packet.qos });
    if (held === 'released') return done(0);
    if (held === null) {
      held = [];
      setTimeout(() => {
        const h = held;
        held = 'released';
        out({ event: 'released', held: h.length });
        for (const d of h) d(0);
      }, spec.holdAcksMs);
    }
    held.push(done);
  };
}

const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, opts);
let left = Number(spec.count || 0);
let ending = false;

function finish(code) {
  if (ending) return;
  ending = true;
  if (spec.abort) {
    // No DISCONNECT: the broker sees the network connection fail.
    client.stream.destroy();
    setTimeout(() => process.exit(code), 100);
    return;
  }
  const d = spec.disconnect || {};
  client.end(false, { reasonCode: d.reasonCode || 0, properties: d.properties }, () =>
    process.exit(code),
  );
}

// One SUBSCRIBE per filter, in order, each awaited (so each may carry its
// own identifier, and a repeated filter finds the first one in place).
// Returns the granted QoS / reason codes.
async function subscribeAll(subs) {
  const granted = [];
  for (const s of subs || []) {
    const o = { qos: s.qos || 0 };
    if (s.nl !== undefined) o.nl = !!s.nl;
    if (s.rap !== undefined) o.rap = !!s.rap;
    if (s.rh !== undefined) o.rh = s.rh;
    if (s.id !== undefined) o.properties = { subscriptionIdentifier: s.id };
    const g = await client.subscribeAsync(s.filter, o);
    granted.push(g[0].qos);
  }
  return granted;
}

async function publishAll(list) {
  for (const m of list || []) {
    const payload = m.payload === undefined ? '' : String(m.payload);
    const ack = await client.publishAsync(m.topic, payload, publishOpts(m));
    const line = { event: 'published', topic: m.topic };
    if (ack && ack.reasonCode !== undefined) line.reasonCode = ack.reasonCode;
    out(line);
  }
}

client.on('connect', async (connack) => {
  out(
    flatten(connack.properties, {
      event: 'connect',
      sessionPresent: connack.sessionPresent,
      reasonCode: connack.reasonCode,
    }),
  );
  try {
    if (mode === 'connect') {
      if (spec.subs) out({ event: 'subscribed', granted: await subscribeAll(spec.subs) });
      for (const f of spec.unsubs || []) {
        const ack = await client.unsubscribeAsync(f);
        out({ event: 'unsubscribed', filter: f, codes: JSON.stringify(ack && ack.granted) });
      }
      finish(0);
    } else if (mode === 'sub') {
      out({ event: 'ready', granted: await subscribeAll(spec.subs) });
      if (spec.publish) await publishAll(spec.publish);
      if (spec.publish) out({ event: 'done' });
      if (spec.quietMs) setTimeout(() => finish(0), spec.quietMs);
    } else if (mode === 'pub') {
      await publishAll(spec.publish);
      out({ event: 'done' });
      finish(0);
    } else {
      out({ event: 'error', message: `unknown mode ${mode}` });
      process.exit(1);
    }
  } catch (err) {
    out({ event: 'error', message: String(err && err.message), code: err && err.code });
    process.exit(1);
  }
});

client.on('message', (topic, payload, packet) => {
  out(
    flatten(packet.properties, {
      event: 'message',
      topic,
      wireTopic: packet.topic.toString(),
      payload: payload.toString(),
      qos: packet.qos,
      retain: packet.retain,
      dup: packet.dup,
    }),
  );
  if (left > 0 && --left === 0) finish(0);
});

if (spec.logAcks) {
  client.on('packetreceive', (packet) => {
    if (['puback', 'pubrec', 'pubcomp', 'unsuback'].includes(packet.cmd)) {
      const line = { event: 'ack', cmd: packet.cmd, messageId: packet.messageId };
      // UNSUBACK carries one code per filter (MQTT.js: granted).
      line.reasonCode = packet.cmd === 'unsuback' ? JSON.stringify(packet.granted) : packet.reasonCode;
      out(line);
    }
  });
}

client.on('disconnect', (packet) => {
  out(flatten(packet.properties, { event: 'disconnect', reasonCode: packet.reasonCode }));
});
client.on('close', () => out({ event: 'close' }));
client.on('error', (err) => {
  if (ending) return;
  out({ event: 'error', message: String(err && err.message), code: err && err.code });
  if (!client.connected) process.exit(1);
});
setTimeout(() => {
  out({ event: 'timeout' });
  process.exit(2);
}, spec.timeoutMs || 15000);

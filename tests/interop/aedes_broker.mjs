// A plain aedes broker (in-memory: a restart loses every session and retained message) on
// 127.0.0.1:PORT, for the interop tests. Usage: node aedes_broker.mjs PORT NODE_MODULES_DIR
import { createServer } from 'node:net'
import { pathToFileURL } from 'node:url'
import { join } from 'node:path'

const [port, modules] = process.argv.slice(2)
const { Aedes } = await import(pathToFileURL(join(modules, 'aedes', 'aedes.js')).href)
const broker = await Aedes.createBroker()
const server = createServer(broker.handle)
server.listen(Number(port), '127.0.0.1', () => console.log(`aedes listening on ${port}`))

// Runs an edge-run bundle with onnxruntime-node: node run_bundle.mjs BUNDLE_DIR IDS.json
// IDS.json: [[id, ...], ...] token-id rows (framed as bundle.json "tokenizer" says); they are
// right-padded with pad_id into one batch. Prints {"logits": [[...]], "probabilities": [[...]]}.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";

const [dir, idsPath] = process.argv.slice(2);
const meta = JSON.parse(readFileSync(join(dir, "bundle.json"), "utf8"));
const rows = JSON.parse(readFileSync(idsPath, "utf8"));
const width = Math.max(...rows.map((r) => r.length));
const ids = new BigInt64Array(rows.length * width).fill(BigInt(meta.tokenizer.pad_id));
const mask = new BigInt64Array(rows.length * width);
rows.forEach((r, i) => r.forEach((id, j) => { ids[i * width + j] = BigInt(id); mask[i * width + j] = 1n; }));

const session = await ort.InferenceSession.create(join(dir, "model.onnx"));
const out = await session.run({
  input_ids: new ort.Tensor("int64", ids, [rows.length, width]),
  attention_mask: new ort.Tensor("int64", mask, [rows.length, width]),
});
const asRows = (t) => Array.from({ length: t.dims[0] }, (_, i) => Array.from(t.data.slice(i * t.dims[1], (i + 1) * t.dims[1])));
const result = { logits: asRows(out.logits) };
if (out.probabilities) result.probabilities = asRows(out.probabilities);
console.log(JSON.stringify(result));

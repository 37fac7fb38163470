// Load a run's browser directory with transformers.js, the way a web app does, and check it
// against compress's own onnxruntime evaluation on the same token ids.
//
//   node bench/transformers_js.mjs runs/web/browser q4 504,3575,282,4649,314
//
// Prints the token ids transformers.js's tokenizer gives for a prompt, the greedy next token at
// every position of the given ids, and a short greedy continuation. dtype: fp32 (onnx/model.onnx),
// q8 (model_quantized.onnx) or q4 (model_q4.onnx). bench/browser.py runs it for every dtype and
// compares with compress's onnxruntime evaluation.
import path from 'node:path';
import { AutoTokenizer, AutoModelForCausalLM, env, Tensor } from '@huggingface/transformers';

const [dir, dtype = 'q4', idsArg = '504,3575,282,4649,314'] = process.argv.slice(2);
if (!dir) { console.error('usage: node bench/transformers_js.mjs <browser dir> [fp32|q8|q4] [ids]'); process.exit(2); }
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;
const name = path.basename(path.resolve(dir));

const tokenizer = await AutoTokenizer.from_pretrained(name);
const model = await AutoModelForCausalLM.from_pretrained(name, { dtype });
const ids = idsArg.split(',').map(Number);
const input_ids = new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
const attention_mask = new Tensor('int64', BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
const { logits } = await model({ input_ids, attention_mask });
const [, T, V] = logits.dims;
const greedy = [];
for (let t = 0; t < T; t++) {
  let best = 0;
  for (let v = 1; v < V; v++) if (logits.data[t * V + v] > logits.data[t * V + best]) best = v;
  greedy.push(best);
}
const prompt = tokenizer('The capital of France is');
const out = await model.generate({ ...prompt, max_new_tokens: 12, do_sample: false });
console.log(JSON.stringify({
  dtype, prompt_ids: Array.from(prompt.input_ids.data).map(Number), greedy_next: greedy,
  text: tokenizer.decode(out[0], { skip_special_tokens: true }),
}));

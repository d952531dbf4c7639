// Validates every KEDA object (keda.sh/v1alpha1) in the given YAML files against KEDA's CRD schema,
// as published in @kubernetes-models/keda; other kinds are left to kubernetes-validate (tests/test_k8s.py).
// Prints one line per object; exits 1 when any is invalid, 2 when a KEDA kind is unknown here.
import { readFileSync } from "node:fs";
import { loadAll } from "js-yaml";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

let status = 0;
for (const file of process.argv.slice(2)) {
  for (const object of loadAll(readFileSync(file, "utf8"))) {
    if (!object || !String(object.apiVersion).startsWith("keda.sh/")) continue;
    const Model = keda[object.kind];
    const name = `${file}: ${object.kind}/${object.metadata?.name}`;
    if (!Model) {
      console.log(`${name}: no schema for ${object.apiVersion} ${object.kind}`);
      status = Math.max(status, 2);
      continue;
    }
    try {
      new Model(object).validate();
      console.log(`${name}: valid`);
    } catch (error) {
      console.log(`${name}: INVALID: ${error.message}`);
      status = 1;
    }
  }
}
process.exit(status);

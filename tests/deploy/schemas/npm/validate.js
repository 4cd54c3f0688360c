// Validates manifests with the validators @kubernetes-models generates from the published CRDs.
// stdin: a JSON list of manifests; stdout: a JSON list, null for a valid manifest, else the error.
"use strict";
const models = {
  "keda.sh/v1alpha1/ScaledObject": () => require("@kubernetes-models/keda/keda.sh/v1alpha1").ScaledObject,
  "serving.knative.dev/v1/Service": () => require("@kubernetes-models/knative/serving.knative.dev/v1").Service,
};
const docs = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = docs.map((doc) => {
  const model = models[`${doc.apiVersion}/${doc.kind}`];
  if (!model) return `no validator for ${doc.apiVersion} ${doc.kind}`;
  try {
    new (model())(doc).validate();
    return null;
  } catch (err) {
    return String(err.message || err);
  }
});
process.stdout.write(JSON.stringify(out));

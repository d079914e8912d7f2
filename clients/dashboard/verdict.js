// NeuroLens dashboard: the results of a finished Stage 2 job.
// This is the placeholder the job page calls (NeuroLens.renderVerdict); it shows the report's
// flat metrics as a list, through the same renderer app.js uses for other stages' metrics, until
// the verdict panel (EEG, noise and shuffled EEG side by side, the interval, a sentence) replaces
// this file.
"use strict";

window.NeuroLens = window.NeuroLens || {};

/**
 * Render a finished Stage 2 job's results into ``element``.
 *
 * @param {HTMLElement} element the job page's results container (emptied first)
 * @param {object} job the job as GET api/jobs/{id} returns it
 */
window.NeuroLens.renderVerdict = function renderVerdict(element, job) {
  window.NeuroLens.renderMetricList(element, job.metrics || {});
};

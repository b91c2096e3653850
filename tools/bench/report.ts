/**
 * Benchmark output: a Markdown table of figures beside their targets (PASS/MISS are
 * findings, not test failures) and plots rendered headless as SVG with Vega-Lite
 * (vega's 'none' renderer: no canvas, no browser).
 */
import fs from 'node:fs';
import path from 'node:path';
import * as vega from 'vega';
import { compile, type TopLevelSpec } from 'vega-lite';

// ------------------------------------------------------------------ table

export interface Figure {
  /** What was measured, e.g. "restore p50 (hot standby)". */
  name: string;
  /** The measured value, already in `unit`; null = not measured in this run. */
  value: number | null;
  unit: string;
  /** The target, e.g. { op: '<=', value: 60 }; absent = figure without a target. */
  target?: { op: '<=' | '>='; value: number; unit?: string };
  /** How the value was obtained (sample count, ratio of what to what). */
  note?: string;
}

export type Verdict = 'PASS' | 'MISS' | 'n/m' | '';

export function verdict(f: Figure): Verdict {
  if (!f.target) return '';
  if (f.value === null || !Number.isFinite(f.value)) return 'n/m';
  return (f.target.op === '<=' ? f.value <= f.target.value : f.value >= f.target.value) ? 'PASS' : 'MISS';
}

function fmt(v: number | null, unit: string): string {
  if (v === null || !Number.isFinite(v)) return '–';
  const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
  return `${v.toFixed(digits)}${unit ? ` ${unit}` : ''}`;
}

/** Pipes and newlines would break a Markdown table cell. */
function cell(s: string): string {
  return s.replaceAll('|', '\\|').replaceAll('\n', ' ');
}

export function markdownTable(figures: readonly Figure[]): string {
  const lines = ['| figure | measured | target | verdict | note |', '|---|---:|---:|:---:|---|'];
  for (const f of figures) {
    const target = f.target ? `${f.target.op === '<=' ? '≤' : '≥'} ${fmt(f.target.value, f.target.unit ?? f.unit)}` : '';
    lines.push(`| ${cell(f.name)} | ${fmt(f.value, f.unit)} | ${target} | ${verdict(f)} | ${cell(f.note ?? '')} |`);
  }
  return lines.join('\n');
}

// ------------------------------------------------------------------ plots

export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

export async function writeSvg(file: string, spec: TopLevelSpec): Promise<void> {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, await renderSvg(spec));
}

/**
 * The plots of one run into `dir`: `put` renders one, `files` names those written
 * (relative to `dir`). A plot that fails is reported through `log` and left out, so the
 * figures of a run are never lost to a plot.
 */
export function plotDir(
  dir: string,
  log: (s: string) => void,
): { files: string[]; put: (name: string, spec: TopLevelSpec) => Promise<void> } {
  const files: string[] = [];
  const put = async (name: string, spec: TopLevelSpec): Promise<void> => {
    try {
      await writeSvg(path.join(dir, name), spec);
      files.push(name);
    } catch (e) {
      log(`plot ${name} failed: ${(e as Error).message}`);
    }
  };
  return { files, put };
}

export interface TimelineInput {
  title: string;
  /** RAM the migration stream had sent, over time (s since the migration started). */
  ram: { t: number; mib: number }[];
  /** Checkpoints: when they were sent (s) and the guest pause they cost (ms). */
  checkpoints: { t: number; epoch: number; pauseMs: number; kib: number }[];
  /** Phase changes and the outcome, drawn as labelled rules (s). */
  events: { t: number; label: string }[];
  /** Guest frames held by the destination's gate (s; VMs with a NIC), drawn as a third panel. */
  held?: { t: number; frames: number }[];
}

/** One migration: RAM transferred on top, checkpoint pauses below, shared time axis. */
export function timelineSpec(m: TimelineInput): TopLevelSpec {
  const width = 640;
  // Labels run upward from the bottom of each panel, inside it.
  const rules = (height: number) => ({
    data: { values: m.events },
    layer: [
      { mark: { type: 'rule', strokeDash: [4, 3], color: '#888' }, encoding: { x: { field: 't', type: 'quantitative' } } },
      {
        mark: { type: 'text', angle: 270, align: 'left', baseline: 'bottom', dx: 4, fontSize: 9, color: '#555' },
        encoding: { x: { field: 't', type: 'quantitative' }, y: { value: height - 4 }, text: { field: 'label' } },
      },
    ],
  });
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: m.title,
    vconcat: [
      {
        width,
        height: 160,
        layer: [
          {
            data: { values: m.ram },
            mark: { type: 'line', point: true, interpolate: 'step-after' },
            encoding: {
              x: { field: 't', type: 'quantitative', title: null },
              y: { field: 'mib', type: 'quantitative', title: 'RAM sent (MiB)' },
            },
          },
          rules(160),
        ],
      },
      {
        width,
        height: 120,
        layer: [
          {
            data: { values: m.checkpoints },
            mark: { type: 'bar', width: 3, color: '#d62728' },
            encoding: {
              x: { field: 't', type: 'quantitative', title: 's since the migration started' },
              y: { field: 'pauseMs', type: 'quantitative', title: 'checkpoint pause (ms)' },
              tooltip: [{ field: 'epoch' }, { field: 'pauseMs' }, { field: 'kib' }],
            },
          },
          rules(120),
        ],
      },
      ...(m.held?.length
        ? [
            {
              width,
              height: 100,
              layer: [
                {
                  data: { values: m.held },
                  mark: { type: 'area', interpolate: 'step-after', color: '#2ca02c', opacity: 0.6 },
                  encoding: {
                    x: { field: 't', type: 'quantitative', title: 's since the migration started' },
                    y: { field: 'frames', type: 'quantitative', title: 'held frames (D gate)' },
                  },
                },
                rules(100),
              ],
            },
          ]
        : []),
    ],
    resolve: { scale: { x: 'shared' } },
  } as TopLevelSpec;
}

/** Grouped bars: one group per `group`, one bar per `series`, with an optional target rule. */
export function barsSpec(p: {
  title: string;
  yTitle: string;
  rows: { group: string; series: string; value: number }[];
  target?: { value: number; label: string };
}): TopLevelSpec {
  const layers: unknown[] = [
    {
      mark: 'bar',
      encoding: {
        x: { field: 'group', type: 'nominal', title: null, axis: { labelAngle: 0 } },
        xOffset: { field: 'series' },
        y: { field: 'value', type: 'quantitative', title: p.yTitle },
        color: { field: 'series', type: 'nominal', title: null },
      },
    },
    {
      mark: { type: 'text', dy: -4, fontSize: 9 },
      encoding: {
        x: { field: 'group', type: 'nominal' },
        xOffset: { field: 'series' },
        y: { field: 'value', type: 'quantitative' },
        text: { field: 'value', type: 'quantitative', format: '.0f' },
      },
    },
  ];
  if (p.target) {
    layers.push({
      data: { values: [p.target] },
      layer: [
        { mark: { type: 'rule', color: '#d62728', strokeDash: [6, 3] }, encoding: { y: { field: 'value', type: 'quantitative' } } },
        {
          mark: { type: 'text', align: 'right', dy: -5, color: '#d62728', fontSize: 9 },
          encoding: { y: { field: 'value', type: 'quantitative' }, x: { value: 'width' }, text: { field: 'label' } },
        },
      ],
    });
  }
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: p.title,
    width: 360,
    height: 220,
    data: { values: p.rows },
    layer: layers,
  } as TopLevelSpec;
}

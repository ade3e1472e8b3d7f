package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"html/template"
	"image/color"
	"sort"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// bucket is one point of a usage time series: the bucket's start and its counts.
type bucket struct {
	Start   time.Time
	Uses    float64
	Denials float64
}

// series is a time series found in the usage report, and where: Path is the members leading to it, e.g.
// operations, encrypt, callers, <caller>, hours.
type series struct {
	Path    []string
	Buckets []bucket
	Merged  int // >0: the sum of this many series (mergeSmallest)
}

// findSeries walks the usage report for time series: lists of objects that each have a "start" time and a
// "uses" or "denials" count, wherever they are. The engine's report may grow other members: they are shown as
// JSON, not charted.
func findSeries(raw json.RawMessage) []series {
	if len(raw) == 0 {
		return nil
	}
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	var v interface{}
	if d.Decode(&v) != nil {
		return nil
	}
	var found []series
	var walk func(v interface{}, path []string)
	walk = func(v interface{}, path []string) {
		switch x := v.(type) {
		case map[string]interface{}:
			names := make([]string, 0, len(x))
			for n := range x {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				walk(x[n], append(append([]string(nil), path...), n))
			}
		case []interface{}:
			if b, ok := asBuckets(x); ok {
				found = append(found, series{Path: path, Buckets: b})
			}
		}
	}
	walk(v, nil)
	return found
}

func asBuckets(list []interface{}) ([]bucket, bool) {
	if len(list) == 0 {
		return nil, false
	}
	out := make([]bucket, 0, len(list))
	for _, item := range list {
		obj, ok := item.(map[string]interface{})
		if !ok {
			return nil, false
		}
		s, _ := obj["start"].(string)
		start, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return nil, false
		}
		uses, okU := number(obj["uses"])
		denials, okD := number(obj["denials"])
		if !okU && !okD {
			return nil, false
		}
		out = append(out, bucket{Start: start, Uses: uses, Denials: denials})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start.Before(out[j].Start) })
	return out, true
}

func number(v interface{}) (float64, bool) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	f, err := n.Float64()
	return f, err == nil
}

// chart is one rendered usage chart: series that differ only in the member before their last (in the engine's
// report, the caller) share a chart, one line each.
type chart struct {
	Title  string
	SVG    template.HTML // gonum/plot's SVG: it escapes every text it draws (caller names are untrusted)
	Lines  []chartLine
	Period string
}

// chartLine is one line's totals, for the table under the chart.
type chartLine struct {
	Label         string
	Uses, Denials float64
	First, Last   time.Time
	Buckets       int
	Merged        int // >0: the line sums this many series too small to draw apart
}

// maxLines is how many lines a chart draws apart; the rest are summed into one, so that a key with thousands of
// callers still gives a readable chart.
const maxLines = 8

func usageCharts(raw json.RawMessage) ([]chart, error) {
	groups := map[string]*chart{}
	members := map[string][]series{}
	var order []string
	for _, s := range findSeries(raw) {
		title, label, period := "usage", "all", ""
		if n := len(s.Path); n >= 1 {
			period = s.Path[n-1]
			if n >= 2 {
				label = s.Path[n-2]
				if n >= 3 {
					title = strings.Join(s.Path[:n-2], " / ")
				}
			}
		}
		k := title + "\x00" + period
		if groups[k] == nil {
			groups[k] = &chart{Title: title, Period: period}
			order = append(order, k)
		}
		s.Path = []string{label}
		members[k] = append(members[k], s)
	}
	sort.SliceStable(order, func(i, j int) bool { // by subject, then the finest period first
		ti, pi, _ := strings.Cut(order[i], "\x00")
		tj, pj, _ := strings.Cut(order[j], "\x00")
		if ti != tj {
			return ti < tj
		}
		return periodRank(pi) < periodRank(pj)
	})
	var charts []chart
	for _, k := range order {
		c := groups[k]
		lines := mergeSmallest(members[k])
		for _, s := range lines {
			l := chartLine{Label: s.Path[0], Buckets: len(s.Buckets), First: s.Buckets[0].Start,
				Last: s.Buckets[len(s.Buckets)-1].Start, Merged: s.Merged}
			for _, b := range s.Buckets {
				l.Uses += b.Uses
				l.Denials += b.Denials
			}
			c.Lines = append(c.Lines, l)
		}
		svg, err := renderChart(c.Title+" — "+c.Period, lines)
		if err != nil {
			return nil, fmt.Errorf("chart %s: %w", c.Title, err)
		}
		c.SVG = svg
		charts = append(charts, *c)
	}
	return charts, nil
}

// periodRank orders the engine's bucket sizes finest first; other names come after, by name (a stable sort).
func periodRank(period string) int {
	switch period {
	case "minutes":
		return 0
	case "hours":
		return 1
	case "days":
		return 2
	}
	return 3
}

// mergeSmallest keeps the maxLines-1 series with the most uses and denials and sums the others into one.
func mergeSmallest(all []series) []series {
	if len(all) <= maxLines {
		return all
	}
	total := func(s series) (t float64) {
		for _, b := range s.Buckets {
			t += b.Uses + b.Denials
		}
		return t
	}
	sorted := append([]series(nil), all...)
	sort.SliceStable(sorted, func(i, j int) bool { return total(sorted[i]) > total(sorted[j]) })
	kept, rest := sorted[:maxLines-1], sorted[maxLines-1:]
	sums := map[time.Time]*bucket{}
	for _, s := range rest {
		for _, b := range s.Buckets {
			if sums[b.Start] == nil {
				sums[b.Start] = &bucket{Start: b.Start}
			}
			sums[b.Start].Uses += b.Uses
			sums[b.Start].Denials += b.Denials
		}
	}
	merged := series{Path: []string{fmt.Sprintf("%d others", len(rest))}, Merged: len(rest)}
	for _, b := range sums {
		merged.Buckets = append(merged.Buckets, *b)
	}
	sort.Slice(merged.Buckets, func(i, j int) bool { return merged.Buckets[i].Start.Before(merged.Buckets[j].Start) })
	return append(kept, merged)
}

// renderChart draws uses (solid) and denials (dashed, when there are any) over time, one colour per line.
func renderChart(title string, lines []series) (template.HTML, error) {
	p := plot.New()
	p.Title.Text = title
	p.X.Tick.Marker = timeTicker{}
	p.X.Label.Text = "UTC"
	p.Y.Label.Text = "count"
	p.Y.Min = 0
	p.Legend.Top, p.Legend.Left = true, true
	p.Legend.XOffs, p.Legend.YOffs = vg.Points(8), -vg.Points(4)
	p.Add(plotter.NewGrid())
	minT, maxT := lines[0].Buckets[0].Start, lines[0].Buckets[0].Start
	for i, s := range lines {
		uses, denials := make(plotter.XYs, len(s.Buckets)), make(plotter.XYs, len(s.Buckets))
		anyDenial := false
		for j, b := range s.Buckets {
			x := float64(b.Start.Unix())
			uses[j] = plotter.XY{X: x, Y: b.Uses}
			denials[j] = plotter.XY{X: x, Y: b.Denials}
			anyDenial = anyDenial || b.Denials > 0
			if b.Start.Before(minT) {
				minT = b.Start
			}
			if b.Start.After(maxT) {
				maxT = b.Start
			}
		}
		col := plotutil.Color(i)
		if err := addLine(p, s.Path[0]+" uses", uses, col, nil); err != nil {
			return "", err
		}
		if anyDenial {
			if err := addLine(p, s.Path[0]+" denials", denials, col, []vg.Length{vg.Points(4), vg.Points(3)}); err != nil {
				return "", err
			}
		}
	}
	if !maxT.After(minT) { // one bucket: give the axis a width
		minT, maxT = minT.Add(-time.Minute), maxT.Add(time.Minute)
	}
	p.X.Min, p.X.Max = float64(minT.Unix()), float64(maxT.Unix())
	canvas := vgsvg.New(24*vg.Centimeter, 9*vg.Centimeter)
	p.Draw(draw.New(canvas))
	var buf bytes.Buffer
	if _, err := canvas.WriteTo(&buf); err != nil {
		return "", err
	}
	// Inline in HTML: the SVG element alone, without the XML declaration and comment before it.
	svg := buf.String()
	if i := strings.Index(svg, "<svg"); i >= 0 {
		svg = svg[i:]
	}
	return template.HTML(svg), nil
}

func addLine(p *plot.Plot, label string, xys plotter.XYs, col color.Color, dashes []vg.Length) error {
	line, points, err := plotter.NewLinePoints(xys)
	if err != nil {
		return err
	}
	line.Color, line.Dashes, line.Width = col, dashes, vg.Points(1.5)
	points.Color, points.Radius = col, vg.Points(2)
	if len(xys) > 60 { // dense series: the line alone
		points.Radius = 0
	}
	p.Add(line, points)
	p.Legend.Add(label, line)
	return nil
}

// timeTicker puts the time axis' ticks, at most about eight, on round UTC times (whole minutes, hours or days) rather
// than on the round numbers of seconds that plot.DefaultTicks picks.
type timeTicker struct{}

var tickSteps = []time.Duration{time.Minute, 5 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour,
	3 * time.Hour, 6 * time.Hour, 12 * time.Hour, 24 * time.Hour, 7 * 24 * time.Hour, 30 * 24 * time.Hour}

func (timeTicker) Ticks(min, max float64) []plot.Tick {
	span := time.Duration(max-min) * time.Second
	step := tickSteps[len(tickSteps)-1]
	for _, s := range tickSteps {
		if span/s <= 8 {
			step = s
			break
		}
	}
	format := "01-02 15:04"
	if step >= 24*time.Hour {
		format = "2006-01-02"
	}
	secs := int64(step / time.Second)
	var ticks []plot.Tick
	for t := (int64(min) + secs - 1) / secs * secs; float64(t) <= max; t += secs {
		ticks = append(ticks, plot.Tick{Value: float64(t), Label: time.Unix(t, 0).UTC().Format(format)})
	}
	return ticks
}

package main

// versions.go: the ESXi versions a lab host can be started as (sim.json "esxi_version", `python -m
// esxisim up --esxi-version`) and what differs between them. Every difference follows an output
// captured on a real host (tests/fixtures/real, provenance in its index.yaml; docs/lab.md "ESXi
// versions" says which sample backs which line). One Go process simulates one host, so the version
// is process-wide (esxiVer), set once in main before anything is printed.

import (
	"fmt"
	"sort"
	"strings"
)

type esxiVersion struct {
	Name       string // "6.7", "7.0", "8.0"
	FullName   string // AboutInfo.FullName
	Version    string
	Build      string
	APIVersion string
	// ProductVersion of the licence ("6.0" for every 6.x host: eclair's ESXi 6.0 report; "7.0"; "8.0").
	LicenseVersion string
	// The cost unit of a licence: per CPU package up to 6.x (eclair, ESXi 6.0), per 32 cores from 7.0.
	CostUnit string
	// 6.x: a failed power operation prints its progress line on stdout and a bare "Power on failed" on
	// stderr, with no fault object (hashicorp/packer#3781 on 6.0 U2; apache/vcl notes "ESXi 6.0, 6.5").
	BarePowerFailure bool
	// 6.x: fault objects start with "dynamicType = <unset>," and every field and msg end with ","
	// (apache/vcl's samples of ESX/ESXi before 7); 7.0+: no dynamicType, "faultMessage = <unset>", fields
	// end with ", " and msg with nothing (the ESXi 9.0 samples).
	OldFaultLayout bool
	// What the licences are called in this generation.
	FreeName, FreeKey, LicensedName, LicensedKey string
}

var esxiVersions = map[string]esxiVersion{
	"6.7": {
		Name: "6.7", FullName: "VMware ESXi 6.7.0 build-8169922", Version: "6.7.0", Build: "8169922",
		APIVersion: "6.7", LicenseVersion: "6.0", CostUnit: "cpuPackage",
		BarePowerFailure: true, OldFaultLayout: true,
		FreeName: "vSphere 6 Hypervisor", FreeKey: "esx.hypervisor.cpuPackage",
		LicensedName: "VMware vSphere 6 Enterprise Plus", LicensedKey: "esx.enterprisePlus.cpuPackage",
	},
	"7.0": {
		Name: "7.0", FullName: "VMware ESXi 7.0.3 build-20328353", Version: "7.0.3", Build: "20328353",
		APIVersion: "7.0.3.0", LicenseVersion: "7.0", CostUnit: "cpuPackage:32core",
		FreeName: "vSphere 7 Hypervisor", FreeKey: "esx.hypervisor.cpuPackageCoreLimited",
		LicensedName: "VMware vSphere 7 Enterprise Plus", LicensedKey: "esx.enterprisePlus.cpuPackageCoreLimited",
	},
	"8.0": {
		Name: "8.0", FullName: "VMware ESXi 8.0.0 build-20513097", Version: "8.0.0", Build: "20513097",
		APIVersion: "8.0.0.0", LicenseVersion: "8.0", CostUnit: "cpuPackage:32core",
		FreeName: "vSphere 8 Hypervisor", FreeKey: "esx.hypervisor.cpuPackageCoreLimited",
		LicensedName: "VMware vSphere 8 Enterprise Plus", LicensedKey: "esx.enterprisePlus.cpuPackageCoreLimited",
	},
}

// defaultESXiVersion is what a host runs when sim.json names none (the shapes of the lab before
// versions existed).
const defaultESXiVersion = "7.0"

// esxiVer is the version this process simulates.
var esxiVer = esxiVersions[defaultESXiVersion]

// setESXiVersion selects the simulated version; an unknown one is an error naming the known ones.
func setESXiVersion(name string) error {
	if name == "" {
		name = defaultESXiVersion
	}
	v, ok := esxiVersions[name]
	if !ok {
		var known []string
		for k := range esxiVersions {
			known = append(known, k)
		}
		sort.Strings(known)
		return fmt.Errorf("esxi_version %q is not simulated (known: %s)", name, strings.Join(known, ", "))
	}
	esxiVer = v
	return nil
}

# inspect: where MicroSIP and each user's ini are, and what they hold. Reads only.
$Request = $args[0]

function Read-FileState([string]$Path) {
    if (-not [IO.File]::Exists($Path)) {
        return [ordered]@{ exists = $false; sha256 = $null; content_b64 = $null }
    }
    $bytes = [IO.File]::ReadAllBytes($Path)
    return [ordered]@{ exists = $true; sha256 = (Get-Sha256 $bytes); content_b64 = [Convert]::ToBase64String($bytes) }
}

function Get-RegistryValue([string]$Key, [string]$Name) {
    if (-not (Test-Path -LiteralPath $Key)) { return $null }
    return (Get-Item -LiteralPath $Key).GetValue($Name)
}

function Get-InstallerDirectory {
    # The installer's own markers, in MicroSIP's order: the default value of HKLM\Software\MicroSIP
    # (a 32-bit installer writes it under WOW6432Node), then an MSI product named MicroSIP.
    foreach ($key in 'SOFTWARE\MicroSIP', 'SOFTWARE\WOW6432Node\MicroSIP') {
        $dir = Get-RegistryValue ('Registry::HKEY_LOCAL_MACHINE\' + $key) ''
        if (-not [string]::IsNullOrEmpty($dir)) { [ordered]@{ source = 'registry'; dir = [string]$dir } }
    }
    foreach ($key in 'SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall', 'SOFTWARE\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall') {
        $root = 'Registry::HKEY_LOCAL_MACHINE\' + $key
        if (-not (Test-Path -LiteralPath $root)) { continue }
        # Best effort: one unreadable product key must not hide the others.
        foreach ($product in @(Get-ChildItem -LiteralPath $root -ErrorAction SilentlyContinue)) {
            if ([string]$product.GetValue('DisplayName') -ne 'MicroSIP') { continue }
            $dir = [string]$product.GetValue('InstallLocation')
            if (-not [string]::IsNullOrEmpty($dir)) { [ordered]@{ source = 'msi'; dir = $dir } }
        }
    }
}

function Find-MicroSip($Install) {
    $exe = [string](Get-Field $Install 'exe')
    if ([string]::IsNullOrEmpty($exe)) { $exe = 'microsip.exe' }
    $mode = [string](Get-Field $Install 'mode')
    if ([string]::IsNullOrEmpty($mode)) { $mode = 'installed' }
    $candidates = @()
    $inventoryDir = [string](Get-Field $Install 'install_dir')
    if (-not [string]::IsNullOrEmpty($inventoryDir)) { $candidates += , [ordered]@{ source = 'inventory'; dir = $inventoryDir } }
    $candidates += @(Get-InstallerDirectory)
    foreach ($candidate in $candidates) {
        $dir = $candidate.dir.Trim().Trim('"')
        $exePath = [IO.Path]::Combine($dir, $exe)
        if ([IO.File]::Exists($exePath)) {
            # The installer's markers mean installed mode, whatever the inventory guessed: that
            # is how MicroSIP itself decides (microsip-format.md 1.2).
            if ($candidate.source -ne 'inventory') { $mode = 'installed' }
            return [ordered]@{ found = $true; mode = $mode; dir = $dir; exe_path = $exePath; source = $candidate.source; exe = $exe }
        }
    }
    return [ordered]@{ found = $false; mode = $mode; dir = $null; exe_path = $null; source = $null; exe = $exe }
}

function Get-RoamingAppData([string]$Sid, [string]$ProfilePath, [string]$Account) {
    $default = [IO.Path]::Combine($ProfilePath, 'AppData', 'Roaming')
    $hive = 'Registry::HKEY_USERS\' + $Sid
    $folders = $hive + '\Software\Microsoft\Windows\CurrentVersion\Explorer\User Shell Folders'
    # A logged-off user's hive is not loaded. Loading NTUSER.DAT ourselves could collide with a
    # logon, so the default location is the answer then.
    if (-not (Test-Path -LiteralPath $folders)) { return $default }
    $raw = [string](Get-Item -LiteralPath $folders).GetValue('AppData', $null, 'DoNotExpandEnvironmentNames')
    if ([string]::IsNullOrEmpty($raw)) { return $default }
    # Expanded with the target user's values: this session's own variables (USERPROFILE,
    # USERNAME, APPDATA) belong to the WinRM account and would point into its profile.
    $vars = @{ USERPROFILE = $ProfilePath }
    $parts = $Account.Split('\')
    if ($parts.Length -eq 2) { $vars['USERDOMAIN'] = $parts[0]; $vars['USERNAME'] = $parts[1] }
    $volatile = $hive + '\Volatile Environment'
    if (Test-Path -LiteralPath $volatile) {
        $key = Get-Item -LiteralPath $volatile
        foreach ($name in $key.GetValueNames()) {
            if (-not [string]::IsNullOrEmpty($name) -and -not $vars.ContainsKey($name)) { $vars[$name] = [string]$key.GetValue($name) }
        }
    }
    foreach ($name in 'SystemDrive', 'SystemRoot', 'windir', 'ProgramData', 'ALLUSERSPROFILE', 'PUBLIC') {
        $value = [Environment]::GetEnvironmentVariable($name)
        if (-not [string]::IsNullOrEmpty($value)) { $vars[$name] = $value }
    }
    $expanded = $raw
    foreach ($name in @($vars.Keys)) {
        $pattern = '%' + [regex]::Escape($name) + '%'
        $expanded = $expanded -replace $pattern, $vars[$name].Replace('$', '$$')
    }
    if ($expanded -match '%[^%\\]+%') {
        # Guessing would write an ini that MicroSIP never reads.
        throw (New-AgentException 'internal' ("cannot expand the AppData folder '{0}' for this user." -f $raw))
    }
    return $expanded
}

function Get-UserState($User, $Install) {
    $item = [ordered]@{
        name = (Get-Field $User 'name'); windows = (Get-Field $User 'windows')
        sid = $null; profile = $null; appdata = $null; path = $null
    }
    try {
        if (-not $Install.found) {
            throw (New-AgentException 'not-installed' 'MicroSIP was not found where the inventory says, nor by registry or MSI.')
        }
        $account = [string]$item.windows
        if ([string]::IsNullOrEmpty($account)) { throw (New-AgentException 'no-account' 'no Windows account is given for this user.') }
        try {
            $sidObject = [System.Security.Principal.NTAccount]::new($account).Translate([System.Security.Principal.SecurityIdentifier])
        } catch {
            if ($_.Exception.GetBaseException() -is [System.Security.Principal.IdentityNotMappedException]) {
                throw (New-AgentException 'no-account' ("the Windows account {0} cannot be resolved to a SID." -f $account))
            }
            throw
        }
        $sid = $sidObject.Value
        $item['sid'] = $sid
        # The canonical DOMAIN\name, as %USERNAME% and %USERDOMAIN% would give it at logon.
        $canonical = $account
        try { $canonical = $sidObject.Translate([System.Security.Principal.NTAccount]).Value } catch { $canonical = $account }
        # From ProfileList, never from this session's environment, which is the WinRM account's.
        $profileKey = 'Registry::HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows NT\CurrentVersion\ProfileList\' + $sid
        $profilePath = [string](Get-RegistryValue $profileKey 'ProfileImagePath')
        if ([string]::IsNullOrEmpty($profilePath) -or -not [IO.Directory]::Exists($profilePath)) {
            throw (New-AgentException 'no-profile' ("{0} has no profile on this workstation (never logged on)." -f $account))
        }
        $item['profile'] = $profilePath
        $appData = Get-RoamingAppData $sid $profilePath $canonical
        $item['appdata'] = $appData
        $iniName = [IO.Path]::GetFileNameWithoutExtension($Install.exe) + '.ini'
        if ($Install.mode -eq 'portable') { $path = [IO.Path]::Combine($Install.dir, $iniName) }
        else { $path = [IO.Path]::Combine($appData, 'MicroSIP', $iniName) }
        $item['path'] = $path
        # Gathered apart and added only once all is read: a user in error has no file fields.
        $file = Read-FileState $path
        $applied = Read-FileState ([IO.Path]::Combine((Get-StateFolder $path), 'applied'))
        $running = @(Get-OwnedProcessId ([IO.Path]::GetFileName($Install.exe_path)) $sid).Count -gt 0
        foreach ($field in $file.Keys) { $item[$field] = $file[$field] }
        $item['applied'] = $applied
        $item['running'] = $running
        $item['error'] = $null
    } catch {
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

function Get-OverrideState($Install) {
    $item = [ordered]@{ path = $null }
    try {
        if (-not $Install.found) {
            throw (New-AgentException 'not-installed' 'MicroSIP was not found where the inventory says, nor by registry or MSI.')
        }
        $path = [IO.Path]::Combine($Install.dir, 'override.ini')
        $item['path'] = $path
        $file = Read-FileState $path
        $applied = Read-FileState ([IO.Path]::Combine((Get-StateFolder $path), 'applied'))
        foreach ($field in $file.Keys) { $item[$field] = $file[$field] }
        $item['applied'] = $applied
        $item['error'] = $null
    } catch {
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'inspect'
if ($null -ne $refusal) { return $refusal }

$freeBytes = $null
try { $freeBytes = [IO.DriveInfo]::new($env:SystemDrive).AvailableFreeSpace } catch { $freeBytes = $null }
$hostInfo = [ordered]@{
    computer = $env:COMPUTERNAME
    ps_version = $PSVersionTable.PSVersion.ToString()
    free_bytes = $freeBytes
}

$found = Find-MicroSip (Get-Field $Request 'install')
$install = [ordered]@{
    found = $found.found; mode = $found.mode; dir = $found.dir; exe_path = $found.exe_path; source = $found.source
}

$override = $null
if ([bool](Get-Field $Request 'override')) { $override = Get-OverrideState $found }

$users = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'users'
foreach ($user in @($requested)) {
    if ($null -ne $user) { $users.Add((Get-UserState $user $found)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one user.
return [ordered]@{
    protocol = 1; op = 'inspect'; ok = $true
    host = $hostInfo; install = $install; override = $override; users = $users.ToArray()
}

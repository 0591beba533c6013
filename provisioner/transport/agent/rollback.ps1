# rollback: put backup.1 back in place of each file, independently and in order.
$Request = $args[0]

function Invoke-PreparedRollback($Checked, $Prepared, $Item, [string]$IfRunning, $Context) {
    # With the file's folders locked (Initialize-ManagedFile).
    $path = $Checked.path
    $state = $Prepared.state
    $backup1 = [IO.Path]::Combine($state, 'backup.1')
    if (-not [IO.File]::Exists($backup1)) {
        throw (New-AgentException 'no-backup' ("there is no backup of {0} to restore." -f $path))
    }
    if (-not (Invoke-RunningPolicy $Checked $IfRunning $Item $Context)) { return }

    # The current content goes to rolled-back (for SYSTEM and Administrators only), then
    # backup.1's content replaces the file as an apply would write it, and is verified.
    $rolledBack = [IO.Path]::Combine($state, 'rolled-back')
    $old = Read-HeldFile $path
    $previous = $null
    $content = [IO.File]::ReadAllBytes($backup1)
    try {
        if ($null -ne $old) {
            $Item['old_sha256'] = Get-Sha256 $old
            Write-StateFile $state 'rolled-back' $old
            $Item['backup'] = $rolledBack
            $previous = $rolledBack
        } else {
            Remove-FileQuietly $rolledBack
        }
        $written = Write-ManagedFile $Checked $content $previous $Prepared
        if ((Get-Sha256 $written) -ne (Get-Sha256 $content)) {
            Restore-Previous $Checked $previous ($null -ne $old)
            throw (New-AgentException 'verify-failed' 'the file read back differs from the backup; the previous content was put back.')
        }
    } catch {
        $Item['backup'] = $null
        if ([IO.File]::Exists($path)) { Remove-FileQuietly $rolledBack }
        throw
    }
    [IO.File]::Delete($backup1)
    Move-BackupsUp $state
    # Without a merge base the next push treats the restored file as new.
    Remove-FileQuietly ([IO.Path]::Combine($state, 'applied'))
    $Item['new_sha256'] = Get-Sha256 $written
    $Item['status'] = 'restored'
}

function Invoke-RollbackFile($File, [string]$IfRunning, $Roots, $Context) {
    $item = [ordered]@{
        path = (Get-Field $File 'path'); status = 'error'; old_sha256 = $null; new_sha256 = $null
        backup = $null; stopped = 0; error = $null
    }
    try {
        $checked = Test-FileRequest $File
        $prepared = Initialize-ManagedFile $checked $Roots
        try {
            Invoke-PreparedRollback $checked $prepared $item $IfRunning $Context
        } finally {
            Unlock-Folders $prepared.locks
        }
    } catch {
        $item['status'] = 'error'
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'rollback'
if ($null -ne $refusal) { return $refusal }
$ifRunning = [string](Get-Field $Request 'if_running')
if ([string]::IsNullOrEmpty($ifRunning)) { $ifRunning = 'skip' }
if (@('skip', 'stop', 'force') -notcontains $ifRunning) {
    return New-RefusalAnswer 'rollback' ("if_running '{0}' not supported" -f $ifRunning)
}
$roots = @(Get-Field $Request 'appdata_roots')
$context = @{ processes = $null }

$files = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'files'
foreach ($file in @($requested)) {
    if ($null -ne $file) { $files.Add((Invoke-RollbackFile $file $ifRunning $roots $context)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one file.
return [ordered]@{ protocol = 1; op = 'rollback'; ok = $true; files = $files.ToArray() }
